"""Multi-node path: collector ingest rate, and publish-to-readable age, with and without CURVE.

Two measurements, one run, over tcp://127.0.0.1:

1. **Ingest rate**: ``--writers`` processes flood the collector with realistic snapshots
   (``ZmqWriter`` with ``conflate=False`` and a deep queue, so every frame is offered) for
   ``--seconds``; reported is what the collector takes off the socket and relays into the
   segment per second. Baseline in the same run: a bare PULL socket that only counts frames
   (no decode, no checks, no shared memory), the ceiling of one Python receiving thread.
   The collector runs in this process, the writers in their own.
2. **Publish-to-readable age**: one writer process publishes every ``--period-ms`` (production
   settings: conflate on), a collector process (``loadsnap collector``) relays, and this
   process polls the segment's hot table; the age of each new record is this host's wall
   clock at detection minus the writer's ``publish_wall_ns`` (same host, same clock). The
   figure includes the poll interval (~``POLL_SLEEP_S``) and three processes' wakeups.

Run: ``python -m benchmarks.bench_zmq``. CURVE rows need libzmq with CURVE (libsodium).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import zmq

from benchmarks._common import (
    BenchResult,
    Headline,
    Table,
    bench_main,
    fmt_ratio,
    fmt_us,
    latency_stats,
    make_snapshot,
    ratio,
    save_figure,
    subplots,
    unique_instance,
)
from loadsnap import ShmReader, unlink_segment
from loadsnap.collector import Collector, collector_lock_path
from loadsnap.curve import curve_available, generate_keys, load_server_keys
from loadsnap.errors import SegmentUnavailableError

REPORT_ORDER: Final[int] = 6
REPORT_ARGS: Final[list[str]] = []
POLL_SLEEP_S: Final[float] = 20e-6
WAIT_S: Final[float] = 15.0

# argv: instance endpoint rank mode seconds period_ms [server_key client_secret]
#   mode "flood": publish back to back (conflate off, deep queue); "paced": every period_ms.
WRITER_SCRIPT: Final[str] = r"""
import json, signal, sys, time
from benchmarks._common import make_snapshot
from loadsnap.curve import load_client_keys
from loadsnap.zmq_writer import ZmqWriter

instance, endpoint, rank, mode, seconds, period_ms = sys.argv[1:7]
rank, seconds, period_s = int(rank), float(seconds), float(period_ms) / 1000.0
curve = load_client_keys(sys.argv[7], sys.argv[8]) if len(sys.argv) > 8 else None
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
flood = mode == "flood"
writer = ZmqWriter(
    endpoint, rank + 1, rank, instance=instance, curve=curve, conflate=not flood, sndhwm=1000
)
snapshots = [make_snapshot(rank, cycle) for cycle in range(64)]
deadline = time.monotonic() + seconds
i = 0
while not stopping and time.monotonic() < deadline:
    writer.publish(snapshots[i & 63])
    i += 1
    if not flood:
        time.sleep(period_s)
print(json.dumps({"sent": writer.stats.sent, "dropped": writer.stats.dropped}), flush=True)
writer.close()
"""


def _spawn_writer(
    instance: str,
    endpoint: str,
    rank: int,
    mode: str,
    seconds: float,
    period_ms: float,
    keys: Sequence[str],
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", WRITER_SCRIPT, instance, endpoint, str(rank), mode, str(seconds)]
    return subprocess.Popen(
        [*argv, str(period_ms), *keys],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )


def _stop(procs: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        out.append(json.loads(lines[-1]) if lines else {"error": stderr[-500:]})
    return out


def _client_keys(keys_dir: Path | None, rank: int) -> list[str]:
    if keys_dir is None:
        return []
    secret = keys_dir / "clients" / f"client-{rank:03d}.key_secret"
    return [str(keys_dir / "server.key"), str(secret)]


def _wait(predicate: Any, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# --- 1. ingest rate ---------------------------------------------------------------------------


class _RawPull:
    """The baseline: a PULL socket in a thread that only counts frames."""

    def __init__(self, curve_keys: Any) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: Any = None
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        if curve_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve_keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve_keys.secret)
        sock.bind("tcp://127.0.0.1:*")
        self.endpoint = str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            if sock.poll(50):
                with contextlib.suppress(zmq.Again):
                    while True:
                        sock.recv(zmq.NOBLOCK)
                        self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()


def measure_ingest(
    design: str, curve_dir: Path | None, writers: int, seconds: float
) -> dict[str, float]:
    """Frames per second taken in (and relayed, for the collector) over ``seconds``."""
    curve_keys = load_server_keys(curve_dir) if curve_dir is not None else None
    instance = unique_instance("bench-zmq")
    sink: Collector | _RawPull
    if design == "collector":
        sink = Collector(instance, writers, "tcp://127.0.0.1:*", curve=curve_keys)

        def counts() -> tuple[int, int]:
            assert isinstance(sink, Collector)
            return sink.stats.received, sink.stats.relayed
    else:
        sink = _RawPull(curve_keys)

        def counts() -> tuple[int, int]:
            assert isinstance(sink, _RawPull)
            return sink.count, sink.count

    budget = seconds + 10.0
    procs = [
        _spawn_writer(
            instance, sink.endpoint, rank, "flood", budget, 0, _client_keys(curve_dir, rank)
        )
        for rank in range(writers)
    ]
    try:
        if not _wait(lambda: counts()[0] > 1000):
            raise RuntimeError(f"writers never reached the sink ({design})")
        t0, (rx0, relayed0) = time.perf_counter(), counts()
        time.sleep(seconds)
        t1, (rx1, relayed1) = time.perf_counter(), counts()
    finally:
        writer_stats = _stop(procs)
        sink.close()
        unlink_segment(instance)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(collector_lock_path(instance))
    elapsed = t1 - t0
    offered = sum(s.get("sent", 0) + s.get("dropped", 0) for s in writer_stats)
    return {
        "received_per_s": (rx1 - rx0) / elapsed,
        "relayed_per_s": (relayed1 - relayed0) / elapsed,
        "writer_offered_total": float(offered),
    }


# --- 2. publish-to-readable age ---------------------------------------------------------------


def measure_age(curve_dir: Path | None, samples: int, period_ms: float) -> dict[str, Any]:
    """Ages (ns) from the writer's publish to this process seeing the record in the segment."""
    instance = unique_instance("bench-zmq-age")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))  # a free port for the collector process
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "loadsnap", "collector", "--instance", instance]
    argv += ["--dp-size", "1", "--bind", endpoint, "--stats-interval-s", "0", "--duration-s", "120"]
    if curve_dir is not None:
        argv += ["--curve-dir", str(curve_dir)]
    collector = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = samples * period_ms / 1000.0 + 10.0
    writer = _spawn_writer(
        instance, endpoint, 0, "paced", seconds, period_ms, _client_keys(curve_dir, 0)
    )
    ages: list[int] = []
    reader = ShmReader(instance)
    try:
        last_seq = 0
        deadline = time.monotonic() + seconds + WAIT_S
        while len(ages) < samples and time.monotonic() < deadline:
            try:
                table = reader.hot_table()
            except SegmentUnavailableError:
                time.sleep(0.01)
                continue
            seen_ns = time.time_ns()
            seq = int(table.seq[0])
            if table.valid[0] and seq != last_seq:
                # The remote writer's wall-clock stamp is in the payload (not the hot record).
                snapshot = reader.read(0).snapshot
                if last_seq and snapshot is not None and snapshot.seq == seq:
                    # (the first record may have waited for the segment to exist)
                    ages.append(seen_ns - snapshot.publish_wall_ns)
                last_seq = seq
            time.sleep(POLL_SLEEP_S)
    finally:
        reader.close()
        _stop([writer])
        _stop([collector])
        unlink_segment(instance)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(collector_lock_path(instance))
    return {"stats_us": latency_stats(ages), "n": len(ages)}


# --- result -----------------------------------------------------------------------------------


def build_result(
    ingest: dict[str, dict[str, float]], age: dict[str, Any], config: dict[str, Any]
) -> BenchResult:
    result = BenchResult(
        name="bench_zmq",
        question=(
            "How many snapshots per second can one collector relay into shared memory, and how "
            "old is a remote rank's snapshot when a local reader can first see it?"
        ),
        data={"ingest": ingest, "age": age, "config": config},
    )
    rows = []
    for name, label in (
        ("raw_open", "bare PULL, count only (open)"),
        ("collector_open", "collector -> segment (open)"),
        ("raw_curve", "bare PULL, count only (CURVE)"),
        ("collector_curve", "collector -> segment (CURVE)"),
    ):
        if name not in ingest:
            continue
        figures = ingest[name]
        ceiling = ingest.get(name.replace("collector", "raw"), figures)
        rows.append(
            [
                label,
                f"{figures['received_per_s']:,.0f}",
                f"{figures['relayed_per_s']:,.0f}",
                fmt_ratio(ratio(figures["relayed_per_s"], ceiling["received_per_s"])),
            ]
        )
    result.tables.append(
        Table(
            f"Ingest, {config['writers']} flooding writer processes, {config['seconds']} s each",
            ["design", "received/s", "relayed/s", "of bare PULL"],
            rows,
        )
    )
    age_rows = []
    for name, label in (("open", "open"), ("curve", "CURVE")):
        if name not in age:
            continue
        s = age[name]["stats_us"]
        age_rows.append(
            [label, f"{int(s['n'])}", fmt_us(s["p50"]), fmt_us(s["p99"]), fmt_us(s["max"])]
        )
    result.tables.append(
        Table(
            f"Publish -> readable in the segment, one writer every {config['period_ms']} ms (µs)",
            ["channel", "n", "p50", "p99", "max"],
            age_rows,
        )
    )
    if "collector_open" in ingest and "collector_curve" in ingest:
        result.headlines.append(
            Headline(
                metric="collector relay rate, CURVE vs open",
                ours=ingest["collector_curve"]["relayed_per_s"],
                baseline=ingest["collector_open"]["relayed_per_s"],
                baseline_name="open channel",
                unit="snapshots/s",
                better="higher",
            )
        )
    if "open" in age:
        p99_ms = age["open"]["stats_us"]["p99"] / 1000.0
        result.add_target(
            "publish-to-readable p99 below the 20 ms controller refresh",
            p99_ms < 20.0,
            f"p99={p99_ms:.2f} ms",
        )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--writers", type=int, default=2, help="flooding writer processes")
    parser.add_argument("--seconds", type=float, default=3.0, help="ingest window per design")
    parser.add_argument("--samples", type=int, default=2000, help="age samples per channel")
    parser.add_argument("--period-ms", type=float, default=2.0, help="paced writer period")
    parser.add_argument("--no-curve", action="store_true", help="skip the CURVE rows")


QUICK: Final = dict(seconds=0.2, samples=20, period_ms=1.0)


def run(args: argparse.Namespace) -> BenchResult:
    """Ingest rate and age on the open channel, then on the CURVE one where libzmq has it."""
    use_curve = not args.no_curve and curve_available()
    config: dict[str, Any] = {
        "writers": args.writers,
        "seconds": args.seconds,
        "samples": args.samples,
        "period_ms": args.period_ms,
        "payload_bytes": len(msgspec.msgpack.encode(make_snapshot(0))),
        "curve": use_curve,
    }
    ingest: dict[str, dict[str, float]] = {}
    age: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loadsnap-bench-keys-") as tmp:
        keys_dir = Path(tmp) / "keys"
        if use_curve:
            generate_keys(keys_dir, clients=max(args.writers, 1), ranks_per_client=1)
        channels: list[tuple[str, Path | None]] = [("open", None)]
        if use_curve:
            channels.append(("curve", keys_dir))
        for channel, curve_dir in channels:
            for design in ("raw", "collector"):
                ingest[f"{design}_{channel}"] = measure_ingest(
                    design, curve_dir, args.writers, args.seconds
                )
            age[channel] = measure_age(curve_dir, args.samples, args.period_ms)
    return build_result(ingest, age, config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    return bench_main(__doc__, argv, run, add_arguments, QUICK)


# --- report hooks -----------------------------------------------------------------------------


TITLE: Final[str] = "Multi-node (ZMQ collector)"
LIMITS: Final[str] = (
    "Ingest is bound by the collector's single Python thread: per frame a typed msgspec "
    "decode with validation, the rank/epoch/seq checks, and a seqlock write into the "
    "segment; the bare PULL row is the ceiling of that thread with none of the work. CURVE "
    "adds encryption in libzmq's I/O thread, off the Python thread. Telemetry needs a few "
    "hundred snapshots/s per node, so both are orders of magnitude above need. The age is "
    "dominated by cross-process wakeups (writer -> libzmq I/O threads -> collector thread -> "
    "the polling reader) on a 2-core machine, not by the work per message."
)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Ingest rate per channel (bars) and publish-to-readable age percentiles (bars, log)."""
    data = result["data"]
    ingest, age, config = data["ingest"], data["age"], data["config"]
    channels = [(key, label) for key, label in (("open", "open"), ("curve", "CURVE")) if key in age]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    positions = list(range(len(channels)))
    for i, (design, label, color) in enumerate(
        (
            ("raw", "bare PULL, count only", "#7f7f7f"),
            ("collector", "collector → segment", "#1f77b4"),
        )
    ):
        rates = [
            ingest.get(f"{design}_{key}", {}).get("relayed_per_s", float("nan"))
            for key, _ in channels
        ]
        ceilings = [ingest.get(f"raw_{key}", {}).get("received_per_s", 0.0) for key, _ in channels]
        bars = ax1.bar(
            [p + (i - 0.5) * width for p in positions],
            [rate / 1e3 for rate in rates],
            width,
            color=color,
            label=label,
        )
        labels = [f"{rate / 1e3:,.0f}k" for rate in rates]
        if design == "collector":
            labels = [
                f"{text} ({100 * ratio(rate, ceiling):.0f}%)"
                for text, rate, ceiling in zip(labels, rates, ceilings, strict=True)
            ]
        ax1.bar_label(bars, labels, fontsize=8, padding=2)
    ax1.set_xticks(positions, [f"{label} channel" for _, label in channels])
    ax1.set_ylabel("snapshots per second, thousands")
    ax1.set_title(f"Ingest rate, {config['writers']} flooding writer processes")
    ax1.margins(y=0.15)
    ax1.legend(fontsize=8, loc="upper right")

    percentiles = ("p50", "p90", "p99", "max")
    colors = {"open": "#2ca02c", "curve": "#9467bd"}
    for i, (key, label) in enumerate(channels):
        ages_ms = [age[key]["stats_us"][name] / 1e3 for name in percentiles]
        bars = ax2.bar(
            [k + (i - (len(channels) - 1) / 2) * width for k in range(len(percentiles))],
            ages_ms,
            width,
            color=colors[key],
            label=f"{label} channel",
        )
        ax2.bar_label(bars, [f"{ms:.2f}" for ms in ages_ms], fontsize=7, padding=2)
    refresh_ms = 20.0
    ax2.axhline(refresh_ms, color="#d62728", linestyle="--", linewidth=1)
    ax2.text(-0.4, refresh_ms * 1.08, "DP controller refresh: 20 ms", color="#d62728", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylim(top=refresh_ms * 3)
    ax2.set_xticks(list(range(len(percentiles))), list(percentiles))
    ax2.set_ylabel("ms (log)")
    ax2.set_title(f"Publish → readable in the segment (writer every {config['period_ms']:g} ms)")
    ax2.legend(fontsize=8, loc="center left")
    fig.suptitle("Multi-node path: ZMQ collector over tcp://127.0.0.1", fontsize=11)
    return save_figure(fig, out_dir, "zmq.png")


if __name__ == "__main__":
    raise SystemExit(main())
