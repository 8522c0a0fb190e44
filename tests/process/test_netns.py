"""Multi-host over ZMQ, approximated with network namespaces on one machine.

Layout: the collector runs in namespace C; writers run in namespaces W1 and W2, each joined to
C by its own veth pair (10.231.N.2 -> 10.231.N.1), so they reach the collector only over a
real (virtual) link, as a remote node would. The segment lives in /dev/shm, which namespaces do
not separate, so this test reads what the collector relays. CURVE is on (the collector binds a
non-loopback address). Needs root and ``ip netns``; skipped with the reason otherwise. Every
namespace is deleted in ``finally`` (which removes its veth too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from loadsnap import ShmReader, SlotStatus
from loadsnap.collector import collector_lock_path
from loadsnap.curve import curve_available, generate_keys
from tests.helpers import (
    loadsnap_command,
    read_segment,
    spawn_writer,
    stop_process,
    stop_writers,
    wait_until,
)

PORT = 5557
SUBNET = "10.231"
CMD_TIMEOUT_S = 10


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
    )


def _netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not installed"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) not installed"
    if os.geteuid() != 0:
        return "`ip netns` needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN)"
    probe = subprocess.run(
        ["unshare", "-n", "true"], capture_output=True, text=True, timeout=CMD_TIMEOUT_S
    )
    if probe.returncode != 0:
        return f"unshare -n not permitted: {probe.stderr.strip()}"
    name = f"lsprobe-{os.getpid()}"
    added = _ip("netns", "add", name)
    if added.returncode != 0:
        return f"ip netns add not permitted: {added.stderr.strip()}"
    _ip("netns", "del", name)
    if not curve_available():
        return "libzmq built without CURVE"
    return None


_REASON = _netns_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _must(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(result.args[1:])}: {result.stderr.strip()}")


@pytest.fixture
def namespaces() -> Iterator[tuple[str, list[str]]]:
    """(collector namespace, [writer namespaces]) joined by veth pairs; deleted afterwards."""
    tag = f"{os.getpid() % 100_000}"
    collector_ns = f"lsc-{tag}"
    writer_ns = [f"lsw{i}-{tag}" for i in (1, 2)]
    created: list[str] = []
    try:
        for ns in (collector_ns, *writer_ns):
            _must(_ip("netns", "add", ns))
            created.append(ns)
            _must(_ip("-n", ns, "link", "set", "lo", "up"))
        for i, ns in enumerate(writer_ns, start=1):
            near, far = f"lv{i}c{tag}", f"lv{i}w{tag}"  # <= 15 characters
            _must(_ip("link", "add", near, "type", "veth", "peer", "name", far))
            _must(_ip("link", "set", near, "netns", collector_ns))
            _must(_ip("link", "set", far, "netns", ns))
            _must(_ip("-n", collector_ns, "addr", "add", f"{SUBNET}.{i}.1/24", "dev", near))
            _must(_ip("-n", ns, "addr", "add", f"{SUBNET}.{i}.2/24", "dev", far))
            _must(_ip("-n", collector_ns, "link", "set", near, "up"))
            _must(_ip("-n", ns, "link", "set", far, "up"))
        yield collector_ns, writer_ns
    finally:
        for ns in created:
            _ip("netns", "del", ns)


def _collector_cmd(ns: str, instance: str, keys: Path) -> Sequence[str]:
    return [
        *("ip", "netns", "exec", ns, *loadsnap_command("collector")),
        *("--instance", instance, "--dp-size", "2", "--bind", f"tcp://0.0.0.0:{PORT}"),
        *("--curve-dir", str(keys), "--duration-s", "30", "--stats-interval-s", "0"),
    ]


def test_writers_in_other_namespaces_reach_collector(
    namespaces: tuple[str, list[str]], instance: str, tmp_path: Path
) -> None:
    collector_ns, writer_ns = namespaces
    keys = generate_keys(tmp_path / "keys", clients=2, ranks_per_client=1)
    collector = subprocess.Popen(
        _collector_cmd(collector_ns, instance, tmp_path / "keys"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writers: list[subprocess.Popen[str]] = []
    try:
        for rank, ns in enumerate(writer_ns):
            endpoint = f"tcp://{SUBNET}.{rank + 1}.1:{PORT}"
            key_files = (str(keys.server_public), str(keys.client_secrets[rank]))
            writers.append(
                spawn_writer(
                    instance,
                    endpoint,
                    2,
                    rank,
                    "stream",
                    10,
                    key_files,
                    ("ip", "netns", "exec", ns),
                )
            )
        reader = ShmReader(instance)

        def both_fresh() -> bool:
            reads = read_segment(reader)
            return len(reads) == 2 and all(r.status is SlotStatus.FRESH for r in reads)

        assert wait_until(both_fresh, 15.0), [r.status for r in read_segment(reader)]
        reader.close()
    finally:
        results = stop_writers(writers)
        out, _ = stop_process(collector)
        path = collector_lock_path(instance)
        if os.path.exists(path):
            os.unlink(path)
    stats = json.loads(out.splitlines()[-1])
    assert stats["handshakes"] >= 2 and stats["relayed"] > 0, stats
    assert stats["auth_rejected"] == 0 and stats["dropped"] == 0, stats
    assert all(r.get("sent", 0) > 0 for r in results), results
