"""CURVE: key files, and a collector that admits listed client keys only."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest

from loadsnap import LoadSnapshot, ShmReader
from loadsnap.cli import main as cli_main
from loadsnap.collector import Collector, collector_lock_path, is_loopback_endpoint
from loadsnap.curve import (
    ANY_RANK,
    CLIENTS_DIR,
    RankSet,
    curve_available,
    generate_keys,
    load_client_keys,
    load_ranks,
    load_secret_key,
    load_server_keys,
)
from loadsnap.errors import TransportError, UsageError
from loadsnap.transport import make_writer
from loadsnap.zmq_writer import ZmqWriter
from tests.helpers import report, running_reqs, wait_until

WAIT_S = 10.0

pytestmark = pytest.mark.skipif(not curve_available(), reason="libzmq built without CURVE")


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


@pytest.mark.parametrize(
    ("spec", "ranks", "canonical"),
    [
        ("*", None, "*"),
        (" * ", None, "*"),
        ("3", {3}, "3"),
        ("0-3,8", {0, 1, 2, 3, 8}, "0-3,8"),
        (" 8 , 2-2,0-1 ", {0, 1, 2, 8}, "0-2,8"),
        ("0-65535", set(range(65536)), "0-65535"),
    ],
)
def test_rank_set_parses_and_prints(spec: str, ranks: set[int] | None, canonical: str) -> None:
    parsed = RankSet.parse(spec)
    assert parsed.ranks == (None if ranks is None else frozenset(ranks))
    assert str(parsed) == canonical
    assert RankSet.parse(str(parsed)) == parsed
    assert (5 in parsed) == (ranks is None or 5 in ranks)


@pytest.mark.parametrize("spec", ["", ",", "a", "1,", "3-1", "-1", "1-", "0x3", "65536", "٣"])
def test_rank_set_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        RankSet.parse(spec)


def test_generate_binds_ranks_per_client(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "bound", clients=3, ranks_per_client=2)
    server = load_server_keys(tmp_path / "bound")
    by_name = {client.name: client.ranks for client in server.clients}
    assert by_name == {
        "client-000": RankSet.of({0, 1}),
        "client-001": RankSet.of({2, 3}),
        "client-002": RankSet.of({4, 5}),
    }
    client = load_client_keys(keys.server_public, keys.client_secrets[1])
    assert client.ranks == RankSet.of({2, 3})
    text = (tmp_path / "bound" / CLIENTS_DIR / "client-001.key").read_text()
    assert 'metadata\n    ranks = "2-3"\ncurve\n' in text
    generate_keys(tmp_path / "any", clients=2)  # default: explicitly any rank
    assert all(c.ranks == ANY_RANK for c in load_server_keys(tmp_path / "any").clients)
    assert load_ranks(tmp_path / "any" / CLIENTS_DIR / "client-000.key") == ANY_RANK
    with pytest.raises(UsageError, match="ranks_per_client out of range"):
        generate_keys(tmp_path / "bad", clients=2, ranks_per_client=0)


def _set_ranks_line(path: Path, line: str | None) -> None:
    lines = [
        candidate
        for candidate in path.read_text().splitlines()
        if not candidate.strip().startswith("ranks")
    ]
    if line is not None:
        lines.insert(lines.index("metadata") + 1, line)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('    ranks = "0-x"', 'bad ranks in key file: ranks="0-x"'),
        ('    ranks = "3-1"', 'bad ranks in key file: ranks="3-1"'),
        ("    ranks = ", 'bad ranks in key file: ranks=""'),
        (None, "no ranks in key file"),
    ],
)
def test_bad_or_missing_ranks_named_with_the_file(
    tmp_path: Path, line: str | None, message: str
) -> None:
    generate_keys(tmp_path, clients=2, ranks_per_client=1)
    path = tmp_path / CLIENTS_DIR / "client-001.key"
    _set_ranks_line(path, line)
    with pytest.raises(TransportError) as info:
        load_server_keys(tmp_path)
    text = str(info.value)
    assert text.startswith(message) and f"(path={path})" in text and "\n" not in text, text


def test_same_key_in_two_files_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, clients=1)
    original = tmp_path / CLIENTS_DIR / "client-000.key"
    (tmp_path / CLIENTS_DIR / "copy.key").write_text(original.read_text())
    with pytest.raises(TransportError, match="same client public key in two files"):
        load_server_keys(tmp_path)


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
    assert "server secret" in out and out.count("(one writer node; ranks *)") == 2
    assert "may publish any rank" in out
    names = sorted(p.name for p in (tmp_path / "k" / CLIENTS_DIR).iterdir())
    assert names == [
        "client-000.key",
        "client-000.key_secret",
        "client-001.key",
        "client-001.key_secret",
    ]
    assert cli_main(["keys", "generate", str(tmp_path / "k")]) == 1  # never overwrites
    argv = ["keys", "generate", str(tmp_path / "b"), "--clients", "2", "--ranks-per-client", "4"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "(one writer node; ranks 0-3)" in out and "(one writer node; ranks 4-7)" in out
    assert "may publish any rank" not in out


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_listed_key_passes_unlisted_and_plain_do_not(instance: str, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys", clients=1)
    stranger = generate_keys(tmp_path / "stranger", clients=1)  # valid keys, not on the list
    collector = Collector(
        instance, 3, "tcp://127.0.0.1:*", curve=load_server_keys(tmp_path / "keys")
    )
    listed = ZmqWriter(
        collector.endpoint,
        3,
        0,
        instance=instance,
        curve=load_client_keys(keys.server_public, keys.client_secrets[0]),
    )
    unlisted = ZmqWriter(
        collector.endpoint,
        3,
        1,
        instance=instance,
        curve=load_client_keys(keys.server_public, stranger.client_secrets[0]),
    )
    plain = ZmqWriter(collector.endpoint, 3, 2, instance=instance)
    writers = (listed, unlisted, plain)
    try:
        reader = ShmReader(instance)

        def settled() -> bool:
            for rank, writer in enumerate(writers):
                writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=rank + 1))
            stats = collector.stats
            seen = running_reqs(reader, (0,)) == {0: 1}
            return seen and stats.auth_rejected >= 1 and stats.handshake_failed >= 1

        assert wait_until(settled, WAIT_S), collector.stats_dict()
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


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_wrong_keys_logged_on_both_sides(
    instance: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loadsnap")
    keys = generate_keys(tmp_path / "keys", clients=1)
    stranger = generate_keys(tmp_path / "stranger", clients=1)
    collector = Collector(
        instance,
        2,
        "tcp://127.0.0.1:*",
        curve=load_server_keys(tmp_path / "keys"),
        warn_interval_s=3600.0,  # all within one window: every repeat is held back
    )
    unlisted_keys = load_client_keys(keys.server_public, stranger.client_secrets[0])
    unlisted = [
        ZmqWriter(collector.endpoint, 2, 0, instance=instance, curve=unlisted_keys)
        for _ in range(3)
    ]
    wrong_server = ZmqWriter(
        collector.endpoint,
        2,
        1,
        instance=instance,
        curve=load_client_keys(stranger.server_public, keys.client_secrets[0]),
    )
    plain = ZmqWriter(collector.endpoint, 2, 1, instance=instance)
    writers = [*unlisted, wrong_server, plain]

    def collector_warnings(*parts: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "loadsnap.collector" and all(p in r.getMessage() for p in parts)
        ]

    crypto = "failed: cryptographic error: the peer was given another server public key"
    try:

        def settled() -> bool:
            for writer in writers:
                writer.publish(LoadSnapshot(dp_rank=writer.dp_rank))
            stats = collector.stats
            named = collector_warnings("handshake from 127.0.0.1:", crypto)
            return (
                stats.auth_rejected >= 3
                and stats.handshake_failed >= 10
                and plain.stats.handshake_failures >= 1
                and bool(named)
            )

        assert wait_until(settled, WAIT_S), collector.stats_dict()
        assert all(w.stats.sent == 0 for w in writers)
        failures = {
            "unlisted": [w.stats.handshake_failures for w in unlisted],
            "wrong_server": wrong_server.stats.handshake_failures,
            "plain": plain.stats.handshake_failures,
        }
    finally:
        for writer in writers:
            writer.close()
        collector.close()
    # Collector: one warning per peer and kind, naming the peer (ZAP gives the IP for a rejected
    # key; the monitor gives host:port for protocol failures), however many failures.
    rejected = collector_warnings("key not on the allow-list")
    stranger_key = unlisted_keys.public.decode()
    assert rejected == [
        f"CURVE handshake from 127.0.0.1 failed: key not on the allow-list (key={stranger_key})"
    ]
    assert len(collector_warnings("handshake from 127.0.0.1:", crypto)) == 1
    assert collector.stats.auth_rejected >= 3 and collector.stats.handshake_failed >= 10
    # Writers: each logs its own failure once per burst.
    writer_warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "loadsnap.zmq_writer" and r.levelno == logging.WARNING
    ]
    endpoint = collector.endpoint
    rejected_key = (
        f"CURVE handshake with {endpoint} failed: the collector rejected this writer's key "
        "(ZAP status 400): the key is not on its allow-list (clients/*.key)"
    )
    wrong_key = (
        f"CURVE handshake with {endpoint} failed: the collector closed the connection during "
        "the CURVE handshake (errno=EPIPE); usually a wrong server public key "
        "(LOADSNAP_CURVE_SERVER_KEY)"
    )
    assert writer_warnings.count(rejected_key) == 3
    assert writer_warnings.count(wrong_key) == 1
    plain_lines = [m for m in writer_warnings if m.startswith(f"handshake with {endpoint} failed")]
    assert len(plain_lines) == 1, writer_warnings
    assert "CURVE" in plain_lines[0] or "mechanism mismatch" in plain_lines[0]
    report(
        "curve_wrong_keys_logged",
        {
            "collector_auth_rejected": collector.stats.auth_rejected,
            "collector_handshake_failed": collector.stats.handshake_failed,
            "collector_warnings": len(collector_warnings()),
            "writer_failures": failures,
            "writer_warnings": len(writer_warnings),
        },
    )


@pytest.mark.usefixtures("collector_lock_cleanup")
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

        assert wait_until(arrived, WAIT_S), collector.stats_dict()
        reader.close()
    finally:
        writer.close()
        collector.close()


def test_collector_cli_reports_key_bindings(
    instance: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_keys(tmp_path / "bound", clients=2, ranks_per_client=2)
    generate_keys(tmp_path / "any", clients=3)
    argv = ["collector", "--instance", instance, "--dp-size", "4", "--bind", "tcp://127.0.0.1:*"]
    argv += ["--duration-s", "0.1", "--stats-interval-s", "0"]
    try:
        assert cli_main([*argv, "--curve-dir", str(tmp_path / "bound")]) == 0
        assert "auth=curve (2 client keys, 0 may publish any rank)" in capsys.readouterr().out
        assert cli_main([*argv, "--curve-dir", str(tmp_path / "any")]) == 0
        assert "auth=curve (3 client keys, 3 may publish any rank)" in capsys.readouterr().out
    finally:
        path = collector_lock_path(instance)
        if os.path.exists(path):
            os.unlink(path)


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
