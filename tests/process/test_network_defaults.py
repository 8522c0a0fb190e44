"""Network defaults: ``loadsnap serve`` and ``loadsnap collector`` listen on loopback only.

Each command runs as a real subprocess with no bind flag; the test finds the process's
listening TCP sockets in ``/proc/PID/net/tcp{,6}`` (matched by socket inode to the process's
file descriptors) and checks every one is on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from loadsnap.collector import collector_lock_path, is_loopback_endpoint
from loadsnap.settings import DEFAULT_COLLECTOR_BIND as DEFAULT_BIND
from tests.helpers import free_port, loadsnap_command, report, stop_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

TCP_LISTEN = "0A"
LOOPBACK_V4 = "0100007F"  # 127.0.0.1, little-endian hex as /proc shows it
LOOPBACK_V6 = "00000000000000000000000001000000"  # ::1


def listening(pid: int) -> list[tuple[str, int]]:
    """(hex address, port) of every TCP socket in LISTEN state that ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in inodes:
                addr, port = local.split(":")
                out.append((addr, int(port, 16)))
    return out


def wait_listening(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> list[tuple[str, int]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return []
        found = listening(proc.pid)
        if found:
            return found
        time.sleep(0.05)
    return []


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOADSNAP_")}


def test_serve_binds_loopback_by_default(instance: str) -> None:
    port = free_port()
    cmd = loadsnap_command("serve", "--instance", instance, "--port", str(port))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env()
    )
    try:
        found = wait_listening(proc)
        assert found, f"loadsnap serve did not listen (rc={proc.poll()})"
        assert all(addr in (LOOPBACK_V4, LOOPBACK_V6) for addr, _ in found), found
        assert {p for _, p in found} == {port}
    finally:
        stop_process(proc)
    report("net_serve", {"listening": [f"{a}:{p}" for a, p in found], "loopback_only": True})


def test_collector_binds_loopback_by_default(instance: str) -> None:
    assert is_loopback_endpoint(DEFAULT_BIND)
    host, port = DEFAULT_BIND.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError:
            pytest.skip(f"default collector port in use here: {DEFAULT_BIND}")
    cmd = loadsnap_command(
        *("collector", "--instance", instance, "--dp-size", "1"),
        *("--duration-s", "20", "--stats-interval-s", "0"),
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env())
    try:
        found = wait_listening(proc)
        assert found, f"collector did not listen (rc={proc.poll()})"
        assert all(addr in (LOOPBACK_V4, LOOPBACK_V6) for addr, _ in found), found
        assert {p for _, p in found} == {int(port)}
    finally:
        _, err = stop_process(proc)
        path = collector_lock_path(instance)
        if os.path.exists(path):
            os.unlink(path)
    # Loopback and no keys: no open-channel warning either.
    assert b"WITHOUT CURVE" not in err
    report("net_collector", {"listening": [f"{a}:{p}" for a, p in found], "loopback_only": True})
