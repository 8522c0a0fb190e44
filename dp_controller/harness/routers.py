"""Real routers on loopback, pointed at a worker: SMG (PyPI ``smg``) and the legacy
``sglang-router``. For tests and benchmarks; not production code.

Both wheels ship their router in a Rust extension and an ``smg`` console script (the two
collide), so they are started as ``python -m smg launch ...`` and
``python -m sglang_router launch ...``. A router binds ``127.0.0.1`` only (its port and, for SMG,
its Prometheus port); :meth:`RouterProcess.stop` kills it (SMG keeps its listener open for a
5 s drain window on SIGTERM, which no test needs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeVar

import httpx

__all__ = [
    "RouterProcess",
    "free_port",
    "router_unavailable",
    "start_sglang_router",
    "start_smg",
    "wait_for",
]

START_TIMEOUT_S: Final[float] = 30.0
HTTP_TIMEOUT_S: Final[float] = 5.0
# What a router package is run as, and how its version is asked.
_MODULES: Final[dict[str, str]] = {"smg": "smg", "sglang-router": "sglang_router"}
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def router_unavailable(package: str) -> str | None:
    """Why the router ``package`` (``smg`` or ``sglang-router``) cannot run here, or None."""
    module = _MODULES[package]
    if importlib.util.find_spec(module) is None:
        return f"{package} is not installed (it is in the dev extra)"
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{package} does not start here: {exc}"
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"{package} does not start here: {last[0]}"
    return None


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.1) -> T:
    """Call ``probe`` until it returns something other than None; its value.

    Raises
    ------
    TimeoutError
        Nothing after ``timeout_s``; the message names ``what``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: nothing after {timeout_s} s")
        time.sleep(every_s)


@dataclass
class RouterProcess:
    """One router subprocess on loopback. Single owner."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: str
    metrics_url: str | None = None
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=HTTP_TIMEOUT_S))

    def get(self, path: str) -> httpx.Response:
        """``GET`` on the router."""
        return self.client.get(self.url + path)

    def get_loads(self) -> dict[str, Any]:
        """The router's own ``/get_loads`` document."""
        response = self.get("/get_loads")
        response.raise_for_status()
        doc: dict[str, Any] = response.json()
        return doc

    def metrics_text(self) -> str:
        """SMG's Prometheus text (its ``--prometheus-port``)."""
        assert self.metrics_url is not None, f"{self.name} has no metrics port"
        return self.client.get(self.metrics_url).text

    def log_tail(self, lines: int = 20) -> str:
        """The end of the router's log, for failure messages."""
        with open(self.log_path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Kill the router and wait for it. Idempotent."""
        self.client.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(START_TIMEOUT_S)

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _launch(
    module: str, args: Sequence[str], log_path: str
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller once the child has it
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "launch", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return proc, log


def _ready(router: RouterProcess) -> bool | None:
    if not router.alive():
        raise RuntimeError(f"{router.name} exited at start:\n{router.log_tail()}")
    try:
        return True if router.get("/workers").status_code == 200 else None
    except httpx.TransportError:
        return None


def start_smg(
    worker_url: str,
    log_path: str,
    *,
    policy: str = "round_robin",
    load_monitor_interval_s: int = 1,
    extra: Sequence[str] = (),
) -> RouterProcess:
    """Start SMG on ``127.0.0.1`` for one worker; returns once its HTTP port answers.

    ``policy="cache_aware"`` subscribes to the worker's gRPC KV-event stream (pushed load);
    other policies poll loads every ``load_monitor_interval_s`` (SMG's floor is 1 s).

    Raises
    ------
    RuntimeError
        SMG exited during start (the message quotes its log).
    TimeoutError
        It did not answer in time.
    """
    port, metrics_port = free_port(), free_port()
    args = [
        "--worker-urls",
        worker_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--policy",
        policy,
        "--load-monitor-interval",
        str(load_monitor_interval_s),
        "--disable-tokenizer-autoload",
        "--log-level",
        "warn",
        *extra,
    ]
    proc, log = _launch("smg", args, log_path)
    log.close()
    router = RouterProcess(
        "smg",
        proc,
        f"http://127.0.0.1:{port}",
        log_path,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    try:
        wait_for("smg answering", lambda: _ready(router), START_TIMEOUT_S)
    except BaseException:
        router.stop()
        raise
    return router


def start_sglang_router(
    worker_url: str, log_path: str, *, policy: str = "round_robin"
) -> RouterProcess:
    """Start the legacy sglang-router on ``127.0.0.1`` for one worker (it asks the worker's
    ``/get_load`` when its own ``/get_loads`` is asked).

    Raises
    ------
    RuntimeError
        It exited during start (the message quotes its log).
    TimeoutError
        It did not answer in time.
    """
    port = free_port()
    args = ["--worker-urls", worker_url, "--host", "127.0.0.1", "--port", str(port)]
    proc, log = _launch("sglang_router", [*args, "--policy", policy], log_path)
    log.close()
    router = RouterProcess("sglang-router", proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for("sglang-router answering", lambda: _ready(router), START_TIMEOUT_S)
    except BaseException:
        router.stop()
        raise
    return router
