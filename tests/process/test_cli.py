"""The CLI: ``inspect`` (text and --json), ``top --once``, ``serve`` as a real process, help."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest

from loadsnap import LoadSnapshot, ShmWriter
from loadsnap.cli import build_parser, main
from loadsnap.layout import LAYOUT_MAJOR, LAYOUT_MINOR
from tests.helpers import free_port, loadsnap_command

DP = 2


@pytest.fixture
def dp_size() -> int:
    return DP


@pytest.fixture
def published(writers: list[ShmWriter]) -> list[ShmWriter]:
    """Rank 0 has published once; rank 1 never has."""
    writers[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=4, num_waiting_reqs=2))
    return writers


def test_inspect_json(
    instance: str, published: list[ShmWriter], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--instance", instance, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "ok"
    assert info["dp_size"] == DP
    assert info["layout_version"] == f"{LAYOUT_MAJOR}.{LAYOUT_MINOR}"
    slot0, slot1 = info["slots"]
    assert slot0["status"] == "fresh"
    assert slot0["seq"] == 1
    assert slot0["writer_pid"] == os.getpid()
    assert slot0["writer_alive"] is True
    assert slot0["num_running_reqs"] == 4
    assert slot0["refused_payloads"] == 0
    assert slot1["status"] == "never_published"
    assert slot1["age_seconds"] is None


def test_inspect_text(
    instance: str, published: list[ShmWriter], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--instance", instance]) == 0
    out = capsys.readouterr().out
    assert f"layout {LAYOUT_MAJOR}.{LAYOUT_MINOR}" in out
    assert re.search(r"^\s+0\s+fresh\s", out, re.MULTILINE)
    assert re.search(r"^\s+1\s+never_published\s", out, re.MULTILINE)


def test_inspect_missing_segment(instance: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--instance", instance, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "missing"
    assert main(["inspect", "--instance", instance]) == 1
    assert "missing" in capsys.readouterr().err


def test_top_once(instance: str, published: list[ShmWriter]) -> None:
    result = subprocess.run(
        loadsnap_command("top", "--instance", instance, "--once"),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    assert "fresh" in result.stdout
    assert "never_published" in result.stdout
    assert instance in result.stdout


def test_top_once_missing(instance: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--instance", instance, "--once"]) == 1
    assert "no segment" in capsys.readouterr().err


def test_serve_smoke(instance: str, published: list[ShmWriter]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        loadsnap_command(
            "serve", "--instance", instance, "--port", str(port), "--label", "model=m"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15.0
        while True:
            try:
                health = httpx.get(base + "/healthz", timeout=2.0)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        assert health.status_code == 200
        doc = httpx.get(base + "/v1/loads", timeout=5.0).json()
        assert [load["dp_rank"] for load in doc["loads"]] == [0]
        text = httpx.get(base + "/v1/loads", params={"format": "prometheus"}, timeout=5.0).text
        assert 'loadsnap_num_requests_running{dp_rank="0",model="m"} 4.0' in text
        assert httpx.get(base + "/metrics", timeout=5.0).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"{base}/v1/loads" in out


def test_serve_rejects_bad_label(instance: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--instance", instance, "--label", "novalue"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "top", "serve", "demo"])
def test_help_teaches(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--instance" in out
    assert "Example" in out or "While it runs" in out


def test_demo_and_controller_help_name_the_controller_policy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dp_controller.budget import CONTROLLER_POLICY

    # One declaration of --policy (dp_controller.cli.add_policy_arguments) serves both.
    for command in ("demo", "controller"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert f"(default {CONTROLLER_POLICY.value})" in out, command
        assert build_parser().parse_args([command]).policy == CONTROLLER_POLICY.value
