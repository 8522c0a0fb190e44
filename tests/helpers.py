"""What tests of every kind share: waiting, figures, ports, processes, promtool, writers, demos,
and the slot reads behind the /v1/loads document goldens.

Fixtures built on these live in ``tests/conftest.py``. Import as ``from tests.helpers import ...``
(pytest puts the repository root on ``sys.path``); test modules never import each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import pytest

from loadsnap import (
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    ShmReader,
    ShmWriter,
    SlotRead,
    SlotStatus,
    SpeculativeSection,
    unlink_segment,
)
from loadsnap.errors import SegmentUnavailableError

if TYPE_CHECKING:  # the server (FastAPI, uvicorn) is imported by the tests that serve only
    from loadsnap.server import ServerThread

ROOT: Final[Path] = Path(__file__).resolve().parent.parent
"""The repository root: the working directory of every ``python -m ...`` a test starts."""


def unique_instance(prefix: str, digits: int = 8) -> str:
    """An instance name no other test or process uses: ``<prefix>-<pid>-<digits hex>``."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:digits]}"


# --- waiting and figures ----------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` every ``interval_s`` until it holds or ``timeout_s`` passes.

    Returns its last answer (asked once more at the deadline), for ``assert wait_until(...)``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def report(name: str, figures: dict[str, Any]) -> None:
    """Print figures for RELIABILITY.md (and write them under $LOADSNAP_FIGURES_DIR)."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    out_dir = os.environ.get("LOADSNAP_FIGURES_DIR")
    if out_dir:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as out:
            out.write(line + "\n")


# --- ports and processes ----------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port the kernel just handed out (nothing is bound to it on return)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout_s: float = 5.0
) -> tuple[Any, Any]:
    """Send ``sig`` unless ``proc`` has exited, wait ``timeout_s``, then SIGKILL it.

    Returns what ``communicate`` read: ``(stdout, stderr)``, None for a stream not piped.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def loadsnap_command(*args: str) -> list[str]:
    """``python -m loadsnap ARGS`` with this interpreter."""
    return [sys.executable, "-m", "loadsnap", *args]


def scheduler_command(
    instance: str, dp_size: int, rank: int, request_addr: str, result_addr: str, *args: str
) -> list[str]:
    """``python -m scheduler`` for ``rank`` of ``instance``; ``args`` follow the required flags."""
    return [
        *(sys.executable, "-m", "scheduler", "--instance", instance, "--dp-size", str(dp_size)),
        *("--dp-rank", str(rank), "--request-addr", request_addr, "--result-addr", result_addr),
        *args,
    ]


# --- promtool ---------------------------------------------------------------------------------

PROMTOOL_MISSING: Final[str] = "promtool not installed (Debian package `prometheus` ships it)"


def promtool_path() -> str:
    """promtool's path; skips the test where it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(PROMTOOL_MISSING)
    return path


# promtool's exit status when the text parses but its linter has complaints.
PROMTOOL_LINT_PROBLEMS: Final[int] = 3


def check_promtool(promtool: str, text: str, *, abbreviated_units: Iterable[str] = ()) -> None:
    """``promtool check metrics`` accepts ``text``: it parses and the linter finds nothing.

    ``abbreviated_units`` names metrics whose "should not contain abbreviated units" complaint
    is expected (sglang's own ``_gb``/``_ms`` names, kept by the ``sglang_`` scheme); every
    other complaint, and every named metric's absence from the complaints, fails.
    """
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    output = result.stdout + result.stderr
    expected = {
        f"{name} metric names should not contain abbreviated units" for name in abbreviated_units
    }
    if not expected:
        assert result.returncode == 0, output
        return
    assert result.returncode == PROMTOOL_LINT_PROBLEMS, output
    assert set(output.splitlines()) == expected, output


# --- a live HTTP server over a segment --------------------------------------------------------


@contextlib.contextmanager
def serving(
    instance: str, dp_size: int, snapshots: Sequence[LoadSnapshot]
) -> Iterator[ServerThread]:
    """A :class:`ServerThread` over ``instance``, each snapshot published by its rank's writer.

    A long staleness budget: a run using it must not see the published ranks go stale. The
    server is stopped, the writers closed and the segment unlinked on exit.
    """
    from loadsnap.server import ServerThread, create_app

    writers = [ShmWriter(instance, dp_size, snapshot.dp_rank) for snapshot in snapshots]
    server: ServerThread | None = None
    try:
        for writer, snapshot in zip(writers, snapshots, strict=True):
            writer.publish(snapshot)
        server = ServerThread(create_app(instance, stale_after_s=3600.0)).start()
        yield server
    finally:
        if server is not None:
            server.stop()
        for writer in writers:
            writer.close()
        unlink_segment(instance)


# --- ZMQ writer processes and what they relay into the segment ---------------------------------

# argv: instance endpoint dp_size rank mode arg [server_key client_secret]
#   mode "burst": warm up until connected, publish num_running_reqs=1..arg back to back, idle.
#   mode "stream": publish num_running_reqs=1,2,... every arg milliseconds.
# Stops on SIGTERM (or after 30 s) and prints its counters as one JSON line.
WRITER_SCRIPT: Final[str] = r"""
import json, signal, sys, time
from loadsnap.curve import load_client_keys
from loadsnap.schema import LoadSnapshot
from loadsnap.zmq_writer import ZmqWriter

instance, endpoint, dp_size, rank, mode, arg = sys.argv[1:7]
dp_size, rank, arg = int(dp_size), int(rank), int(arg)
curve = load_client_keys(sys.argv[7], sys.argv[8]) if len(sys.argv) > 8 else None
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
deadline = time.monotonic() + 30.0
writer = ZmqWriter(endpoint, dp_size, rank, instance=instance, curve=curve)
slowest_ns = 0
def publish(k):
    global slowest_ns
    t0 = time.perf_counter_ns()
    writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=k))
    slowest_ns = max(slowest_ns, time.perf_counter_ns() - t0)
if mode == "burst":
    while writer.stats.sent == 0 and not stopping and time.monotonic() < deadline:
        publish(0)
        time.sleep(0.005)
    for k in range(1, arg + 1):
        publish(k)
    print(json.dumps({"burst_done": True}), flush=True)
    while not stopping and time.monotonic() < deadline:
        time.sleep(0.01)
else:
    k = 0
    while not stopping and time.monotonic() < deadline:
        k += 1
        publish(k)
        time.sleep(arg / 1000.0)
stats = {"sent": writer.stats.sent, "dropped": writer.stats.dropped, "slowest_ns": slowest_ns,
         "epoch": writer.epoch, "handshake_failures": writer.stats.handshake_failures}
writer.close()
print(json.dumps(stats), flush=True)
"""


def spawn_writer(
    instance: str,
    endpoint: str,
    dp_size: int,
    rank: int,
    mode: str,
    arg: int,
    keys: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> subprocess.Popen[str]:
    """Start one writer process (``prefix`` runs it elsewhere, e.g. ``ip netns exec NS``)."""
    argv = [*prefix, sys.executable, "-c", WRITER_SCRIPT, instance, endpoint, str(dp_size)]
    return subprocess.Popen(
        [*argv, str(rank), mode, str(arg), *keys],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_writers(procs: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """SIGTERM every writer, collect its final counters; kill any that does not exit."""
    results: list[dict[str, Any]] = []
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"stderr": err})
    return results


def read_segment(reader: ShmReader) -> list[SlotRead]:
    """Every rank's read, or [] while the segment does not exist."""
    try:
        return reader.read_all()
    except SegmentUnavailableError:
        return []


def running_reqs(reader: ShmReader, ranks: Sequence[int]) -> dict[int, int]:
    """``num_running_reqs`` of each readable rank in ``ranks``."""
    out: dict[int, int] = {}
    for read in read_segment(reader):
        if read.rank in ranks and read.snapshot is not None:
            out[read.rank] = read.snapshot.num_running_reqs
    return out


# --- `loadsnap demo` as a process -------------------------------------------------------------

DEMO_STARTUP_TIMEOUT_S: Final[float] = 60.0
DEMO_URL_RE: Final[re.Pattern[str]] = re.compile(r"(http://127\.0\.0\.1:\d+)/v1/loads$")


def demo_command(instance: str, *args: str) -> list[str]:
    """``loadsnap demo --instance INSTANCE --port 0 --no-table ARGS``."""
    return loadsnap_command("demo", "--instance", instance, "--port", "0", "--no-table", *args)


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


class Demo:
    """A ``loadsnap demo`` process whose output a thread reads line by line into ``lines``."""

    def __init__(self, proc: subprocess.Popen[str], instance: str) -> None:
        self.proc = proc
        self.instance = instance
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        assert proc.stdout is not None
        self.pump = threading.Thread(target=_pump, args=(proc.stdout, self.lines), daemon=True)
        self.pump.start()

    @classmethod
    def start(cls, instance: str, *args: str, new_session: bool = False) -> Demo:
        """:func:`demo_command` run from the repository root."""
        proc = subprocess.Popen(
            demo_command(instance, *args),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )
        return cls(proc, instance)

    def wait_for_url(self) -> str:
        deadline = time.monotonic() + DEMO_STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"demo exited: {self.output}"
                continue
            self.output.append(line)
            match = DEMO_URL_RE.search(line)
            if match:
                return match.group(1)
        raise AssertionError(f"demo printed no URL: {self.output}")

    def stop(self, timeout_s: float) -> None:
        """SIGINT, then SIGKILL after ``timeout_s``; every line it printed ends in ``output``."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        self.pump.join(timeout_s)  # EOF once the demo exits
        if proc.stdout is not None:
            proc.stdout.close()
        while not self.lines.empty():
            self.output.append(self.lines.get())


# --- sglang's /v1/loads document -----------------------------------------------------------------

FIXED_NOW: Final[float] = 1_700_000_000.5
"""The wall-clock time the document goldens are rendered at."""


def busy_snapshot(rank: int, **sections: object) -> LoadSnapshot:
    """A busy rank's snapshot with distinct figures, plus the given sections."""
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=12 + rank,
        num_waiting_reqs=3,
        num_waiting_uncached_tokens=900,
        num_used_tokens=40000,
        num_total_tokens=41000,
        max_total_num_tokens=100000,
        max_running_requests=64,
        token_usage=0.4,
        gen_throughput=1520.5,
        cache_hit_rate=0.25,
        utilization=0.75,
        seq=101,
        cycle=1500,
        publish_mono_ns=5_000_000_000,
        publish_wall_ns=1_700_000_000_250_000_000,
        epoch=1,
        last_accepted_dispatch_seq=77,
        **sections,  # type: ignore[arg-type]
    )


def golden_reads() -> list[SlotRead]:
    """Fresh ranks 0 (loadsnap's own section fields) and 1 (sglang-named fields set), then a
    stale, a dead and a never-published rank."""
    own = busy_snapshot(
        0,
        memory=MemorySection(
            weight_bytes=16 * 2**30, kv_cache_bytes=40 * 2**30, kv_token_capacity=100000
        ),
        speculative=SpeculativeSection(num_draft_tokens=4, accept_length=2.5, accept_rate=0.625),
        lora=LoraSection(max_loaded_adapters=8, loaded_adapters=["a", "b"]),
        disaggregation=DisaggregationSection(
            mode="prefill", num_bootstrap_queue_reqs=2, num_inflight_queue_reqs=1
        ),
        queues=QueueSection(num_grammar_queue_reqs=1, num_paused_reqs=2, num_retracted_reqs=3),
    )
    sglang_named = busy_snapshot(
        1,
        memory=MemorySection(weight_gb=15.5, kv_cache_gb=39.25, graph_gb=0.75, token_capacity=9),
        lora=LoraSection(slots_used=3, slots_total=4, utilization=0.75),
        disaggregation=DisaggregationSection(
            mode="decode",
            decode_prealloc_queue_reqs=4,
            decode_transfer_queue_reqs=5,
            decode_retracted_queue_reqs=6,
            kv_transfer_speed_gb_s=12.5,
            kv_transfer_latency_ms=3.25,
        ),
    )
    stale = busy_snapshot(2, queues=QueueSection(num_paused_reqs=9))
    dead = busy_snapshot(3)
    return [
        SlotRead(3, SlotStatus.DEAD, dead, 10.25, 9, 1, 0, "writer is gone"),
        SlotRead(0, SlotStatus.FRESH, own, 0.015, 101, 1, 4242),
        SlotRead(2, SlotStatus.STALE, stale, 3.0, 55, 2, 4243, "age 3.000s > budget 2.0s"),
        SlotRead(4, SlotStatus.NEVER_PUBLISHED, None, None, 0, 0, 0, "no record yet"),
        SlotRead(1, SlotStatus.FRESH, sglang_named, 0.5, 7, 3, 4244),
    ]
