"""Every bad command-line or environment value: one line on stderr, exit 2, nothing started.

The values are refused by argparse (``loadsnap.flags``) before a command runs, so these run
the real ``loadsnap`` entry point in-process: nothing here may start a process or a server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from loadsnap import LoadSnapshot, ShmWriter, __version__
from loadsnap.cli import main
from tests.helpers import loadsnap_command

SCHEDULER = ["scheduler", "--dp-size=2", "--dp-rank=0", "--request-addr=x", "--result-addr=y"]

# (argv, what the one stderr line must say)
BAD_VALUES: list[tuple[list[str], str]] = [
    (["demo", "--dp-size", "-1"], "argument --dp-size: -1 is not in 1..256"),
    (["demo", "--dp-size", "3000"], "3000 is not in 1..256 (one process is started per rank)"),
    (["controller", "--dp-size", "0"], "argument --dp-size: 0 is not in 1..256"),
    (["collector", "--dp-size", "70000"], "70000 is not in 1..65536"),
    (["demo", "--dp-size", "four"], "'four' is not an integer"),
    (["serve", "--port", "99999"], "argument --port: '99999' is not a port in 0..65535"),
    (["demo", "--port", "-5"], "argument --port: '-5' is not a port in 0..65535"),
    (["demo", "--duration-s", "-1"], "argument --duration-s: '-1' is not a positive number"),
    (["demo", "--duration-s", "nan"], "'nan' is not a positive number"),
    (["collector", "--dp-size", "2", "--duration-s", "0"], "'0' is not a positive number"),
    (["controller", "--duration-s", "-3"], "'-3' is not a positive number"),
    (["demo", "--workload", "nope"], "argument --workload: invalid choice: 'nope'"),
    (["controller", "--rate-rps", "0"], "argument --rate-rps: '0' is not a positive number"),
    (["demo", "--rate-rps", "fast"], "'fast' is not a positive number"),
    (["demo", "--policy", "best"], "argument --policy: invalid choice: 'best'"),
    (["controller", "--refresh-interval-ms", "0"], "'0' is not a positive number"),
    (["controller", "--request-slack", "-1"], "'-1' is not an integer >= 0"),
    (["top", "--instance", "../etc"], "argument --instance: invalid instance name"),
    (["inspect", "--instance", ""], "argument --instance: invalid instance name"),
    (["serve", "--instance", "a b"], "invalid instance name"),
    (["inspect", "--shm-dir", "/nonexistent-loadsnap"], "shm directory does not exist"),
    (["top", "--interval-s", "0"], "argument --interval-s: '0' is not a positive number"),
    (["top", "--stale-after-s", "-1"], "argument --stale-after-s: '-1' is not a positive number"),
    (["collector", "--dp-size", "1", "--stats-interval-s", "-1"], "'-1' is not a number >= 0"),
    (["keys", "generate", "d", "--clients", "0"], "argument --clients: '0' is not an integer >= 1"),
    (["demo", "--transport", "carrier-pigeon"], "argument --transport: invalid choice"),
    ([*SCHEDULER, "--publish-every", "0"], "argument --publish-every: '0' is not an integer"),
    ([*SCHEDULER, "--decode-reserve-ratio", "1.5"], "'1.5' is not a ratio in 0..1"),
    ([*SCHEDULER, "--prefill-token-ms", "-1"], "'-1' is not a number >= 0"),
    ([*SCHEDULER, "--log-level", "chatty"], "argument --log-level: invalid choice: 'CHATTY'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"loadsnap {argv[0]}") and ": error: " in lines[0], lines[0]
    assert message in lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOADSNAP_INSTANCE", "../etc", "LOADSNAP_INSTANCE: invalid instance name"),
        ("LOADSNAP_TRANSPORT", "pigeon", "LOADSNAP_TRANSPORT: unknown transport='pigeon'"),
        ("LOADSNAP_PARENT_PID", "-4", "LOADSNAP_PARENT_PID must be a positive pid"),
    ],
)
def test_bad_environment_is_one_line_and_exit_2(
    variable: str,
    value: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["inspect"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"loadsnap: {message}"), lines


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"loadsnap {__version__}\n"


def test_instance_default_is_one_name_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadsnap.cli import build_parser

    for command in (["top"], ["inspect"], ["serve"], ["demo"], ["controller"], SCHEDULER):
        assert build_parser().parse_args(command).instance == "demo", command
    monkeypatch.setenv("LOADSNAP_INSTANCE", "prod")
    for command in (["top"], ["demo"], ["controller"]):
        assert build_parser().parse_args(command).instance == "prod", command


def test_inspect_into_a_closed_pipe_exits_quietly(instance: str) -> None:
    with ShmWriter(instance, 4096, 0) as writer:  # 4096 slot lines: more than a pipe holds
        writer.publish(LoadSnapshot(dp_rank=0))
        with subprocess.Popen(
            loadsnap_command("inspect", "--instance", instance),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            assert proc.stdout.readline().startswith(b"segment ")
            proc.stdout.close()  # `| head -1`
            assert proc.wait(60) == 0
            assert proc.stderr.read() == b""


def test_serve_on_a_busy_port_says_so_before_any_url(instance: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            loadsnap_command("serve", "--instance", instance, "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    assert done.returncode == 1
    assert done.stdout == ""  # no URL printed for a server that never ran
    assert done.stderr.splitlines() == [
        f"loadsnap serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert time.monotonic() - started < 60
