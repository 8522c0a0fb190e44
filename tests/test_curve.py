"""CURVE: key files, and a collector that admits listed client keys only."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadsnap import LoadSnapshot, ShmReader
from loadsnap.cli import main as cli_main
from loadsnap.collector import Collector, collector_lock_path, is_loopback_endpoint
from loadsnap.curve import (
    CLIENTS_DIR,
    curve_available,
    generate_keys,
    load_client_keys,
    load_secret_key,
    load_server_keys,
)
from loadsnap.errors import TransportError, UsageError
from loadsnap.transport import make_writer
from loadsnap.zmq_writer import ZmqWriter
from tests.test_collector import running_reqs, wait_until

pytestmark = pytest.mark.skipif(not curve_available(), reason="libzmq built without CURVE")


@pytest.fixture
def lock_cleanup(instance: str) -> Iterator[None]:
    yield
    path = collector_lock_path(instance)
    if os.path.exists(path):
        os.unlink(path)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generate_writes_secret_files_0600(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys", clients=3)
    assert mode_of(tmp_path / "keys") == 0o700
    assert mode_of(keys.server_secret) == 0o600
    assert all(mode_of(p) == 0o600 for p in keys.client_secrets)
    assert len(keys.client_secrets) == 3
    server = load_server_keys(tmp_path / "keys")
    assert len(server.allowed_clients) == 3 and server.public not in server.allowed_clients
    client = load_client_keys(keys.server_public, keys.client_secrets[0])
    assert client.server_public == server.public and client.public in server.allowed_clients
    with pytest.raises(UsageError, match="refusing to overwrite"):
        generate_keys(tmp_path / "keys")
    with pytest.raises(UsageError, match="clients out of range"):
        generate_keys(tmp_path / "other", clients=0)


def test_loading_refuses_unsafe_or_missing_secret(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path, clients=1)
    os.chmod(keys.client_secrets[0], 0o644)
    with pytest.raises(TransportError, match="readable by group/other"):
        load_secret_key(keys.client_secrets[0])
    with pytest.raises(TransportError, match="no secret key"):
        os.chmod(keys.server_public, 0o600)
        load_secret_key(keys.server_public)
    with pytest.raises(TransportError, match="cannot load"):
        load_secret_key(tmp_path / "missing.key_secret")


def test_keys_generate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "generate", str(tmp_path / "k"), "--clients", "2"]) == 0
    out = capsys.readouterr().out
    assert "server secret" in out and out.count("(one writer node)") == 2
    names = sorted(p.name for p in (tmp_path / "k" / CLIENTS_DIR).iterdir())
    assert names == [
        "client-000.key",
        "client-000.key_secret",
        "client-001.key",
        "client-001.key_secret",
    ]
    assert cli_main(["keys", "generate", str(tmp_path / "k")]) == 1  # never overwrites


@pytest.mark.usefixtures("lock_cleanup")
def test_listed_key_passes_unlisted_and_plain_do_not(instance: str, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys", clients=1)
    stranger = generate_keys(tmp_path / "stranger", clients=1)  # valid keys, not on the list
    collector = Collector(
        instance, 3, "tcp://127.0.0.1:*", curve=load_server_keys(tmp_path / "keys")
    )
    listed = ZmqWriter(
        collector.endpoint, 3, 0, curve=load_client_keys(keys.server_public, keys.client_secrets[0])
    )
    unlisted = ZmqWriter(
        collector.endpoint,
        3,
        1,
        curve=load_client_keys(keys.server_public, stranger.client_secrets[0]),
    )
    plain = ZmqWriter(collector.endpoint, 3, 2)
    writers = (listed, unlisted, plain)
    try:
        reader = ShmReader(instance)

        def settled() -> bool:
            for rank, writer in enumerate(writers):
                writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=rank + 1))
            stats = collector.stats
            seen = running_reqs(reader, (0,)) == {0: 1}
            return seen and stats.auth_rejected >= 1 and stats.handshake_failed >= 1

        assert wait_until(settled), collector.stats_dict()
        time.sleep(0.2)  # the rejected writers keep trying; none of it may land
        for rank, writer in enumerate(writers):
            writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=rank + 1))
        assert sorted(collector.latest()) == [0]
        assert running_reqs(reader, (0, 1, 2)) == {0: 1}
        assert unlisted.stats.sent == 0 and plain.stats.sent == 0  # never got a connection
        assert unlisted.stats.dropped > 0 and plain.stats.dropped > 0
        assert collector.stats.received == collector.stats.relayed
        reader.close()
    finally:
        for writer in writers:
            writer.close()
        collector.close()


@pytest.mark.usefixtures("lock_cleanup")
def test_make_writer_reads_curve_keys_from_env(
    instance: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = generate_keys(tmp_path, clients=1)
    collector = Collector(instance, 2, "tcp://127.0.0.1:*", curve=load_server_keys(tmp_path))
    monkeypatch.setenv("LOADSNAP_COLLECTOR", collector.endpoint)
    monkeypatch.setenv("LOADSNAP_CURVE_SERVER_KEY", str(keys.server_public))
    monkeypatch.setenv("LOADSNAP_CURVE_CLIENT_KEY", str(keys.client_secrets[0]))
    writer = make_writer(instance, 2, 1, transport="zmq")
    try:
        assert isinstance(writer, ZmqWriter) and writer.curve
        reader = ShmReader(instance)

        def arrived() -> bool:
            writer.publish(LoadSnapshot(dp_rank=1, num_running_reqs=4))
            return running_reqs(reader, (1,)) == {1: 4}

        assert wait_until(arrived), collector.stats_dict()
        reader.close()
    finally:
        writer.close()
        collector.close()


def test_open_non_loopback_bind_warns(
    instance: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert is_loopback_endpoint("tcp://127.0.0.1:5557") and is_loopback_endpoint("ipc:///x")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5557")
    # 192.0.2.1 is on no interface here: the bind fails after the warning, nothing is sent.
    argv = ["collector", "--instance", instance, "--dp-size", "1", "--bind", "tcp://192.0.2.1:9"]
    try:
        assert cli_main(argv) == 1
    finally:
        path = collector_lock_path(instance)
        if os.path.exists(path):
            os.unlink(path)
    err = capsys.readouterr().err
    assert "WITHOUT CURVE keys" in err and "loadsnap keys generate" in err
    generate_keys(tmp_path, clients=1)
    assert cli_main([*argv, "--curve-dir", str(tmp_path)]) == 1
    assert "WITHOUT CURVE" not in capsys.readouterr().err
    path = collector_lock_path(instance)
    if os.path.exists(path):
        os.unlink(path)
