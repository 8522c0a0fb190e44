"""``loadsnap demo``: a real small deployment on this machine, shown live.

Starts ``--dp-size`` reference schedulers (subprocesses publishing into shared memory), a DP
controller dispatching a seeded workload to them, and the HTTP server (``/v1/loads``,
``/get_load``, ``/metrics``, ``/healthz``) of a fake sglang worker (:mod:`.engine`: also
``/health``, ``/v1/models``, ``/server_info``), so a router (SMG, sglang-router) can be pointed
at the demo; with ``--grpc-port`` the same worker over gRPC (``SglangScheduler``: health,
model and server info, ``GetLoads``, pushed loads). Draws the per-rank table and prints the
URLs. Ctrl-C, SIGTERM or
the end of ``--duration`` stops everything: controller, server, schedulers, the segment and
the ipc sockets' directory.

One deployment per instance: the demo takes the instance's deployment lock before starting
anything (``dp_controller.harness.fleet.claim_instance``), so a second demo or
``controller --spawn``
of a running instance exits 1 with one line. A demo killed with SIGKILL takes its schedulers
with it (they get SIGTERM), and the next start of the instance reclaims what it left.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from dp_controller.cli import add_policy_arguments, add_workload_arguments
from loadsnap import flags

if TYPE_CHECKING:
    from dp_controller.controller import Controller
    from dp_controller.harness.fleet import SchedulerFleet
    from loadsnap.collector import Collector
    from loadsnap.grpc_server import GrpcServerThread
    from loadsnap.server import ServerThread
    from scheduler.messages import Finished

NON_INTERACTIVE_DURATION_S: Final[float] = 20.0
CHUNK_S: Final[float] = 2.0
STATUS_EVERY_S: Final[float] = 2.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="run a small deployment (schedulers, controller, HTTP) and show its load live",
        description=(
            "Start DP_SIZE reference schedulers, a DP controller replaying a seeded workload "
            "and the HTTP server, then show every rank's load live. Stops on Ctrl-C (when run "
            f"in a terminal) or after --duration-s (default {NON_INTERACTIVE_DURATION_S:.0f} s "
            "when not in a terminal), leaving no segment, socket or process behind."
        ),
        epilog=(
            "While it runs: curl http://127.0.0.1:8000/v1/loads, "
            "curl 'http://127.0.0.1:8000/v1/loads?format=prometheus', "
            "loadsnap top --instance INSTANCE, loadsnap inspect --instance INSTANCE; "
            "a router: python -m smg launch --worker-urls http://127.0.0.1:8000 "
            "(or grpc://127.0.0.1:GRPC_PORT with --grpc-port)"
        ),
    )
    flags.add_instance(parser)
    flags.add_dp_size(parser, default=4, spawns=True)
    flags.add_host_port(
        parser, port=8000, port_help="HTTP port (default 8000; 0 or taken: any free port)"
    )
    flags.add_grpc_port(
        parser,
        help="also serve the fake engine over gRPC on this port (SglangScheduler: health, "
        "model and server info, GetLoads, SubscribeKvEvents; needs loadsnap[grpc])",
    )
    flags.add_duration(
        parser,
        default=None,
        help="stop after this long (default: until Ctrl-C in a terminal, "
        f"else {NON_INTERACTIVE_DURATION_S:.0f} s)",
    )
    add_workload_arguments(parser, default="poisson", duration=False)
    add_policy_arguments(parser)
    flags.add_transport(
        parser,
        help="how schedulers publish: shm (same node; auto is shm here) or zmq (through an "
        "in-process collector on 127.0.0.1, as remote nodes would)",
    )
    parser.add_argument(
        "--no-table", action="store_true", help="print a status line instead of the live table"
    )
    parser.set_defaults(func=run)


class _Workload:
    """Feeds the controller from a worker thread; the controller is used only there."""

    def __init__(self, controller: Controller, args: argparse.Namespace) -> None:
        self.controller = controller
        self.args = args
        self.stop = threading.Event()
        self.submitted = 0
        self.finished = 0
        self.failed = 0  # reported failed by the controller (a rank died or restarted)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="loadsnap-demo-workload")

    def _run(self) -> None:
        from dp_controller.harness.workload import generate_trace, preset

        try:
            start = time.monotonic()
            offset = 0.0
            chunk = 0
            overrides: dict[str, Any] = {"duration_s": CHUNK_S}  # --duration-s ends the demo
            if self.args.rate_rps is not None:
                overrides["rate_rps"] = self.args.rate_rps
            while not self.stop.is_set():
                spec = preset(self.args.workload, seed=self.args.seed + chunk, **overrides)
                for req in generate_trace(spec):
                    due = offset + req.arrival_s
                    while not self.stop.is_set() and (now := time.monotonic() - start) < due:
                        self._count(self.controller.poll(min(0.01, due - now)))
                    if self.stop.is_set():
                        return
                    self.controller.submit(req.prompt, req.max_new_tokens)
                    self.submitted += 1
                offset += CHUNK_S
                chunk += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self.stop.set()

    def _count(self, results: list[Finished]) -> None:
        for result in results:
            if result.status == "ok":
                self.finished += 1
            else:
                self.failed += 1


def _start_server(app: Any, host: str, port: int) -> ServerThread:
    from loadsnap.server import ServerThread

    try:
        return ServerThread(app, host, port).start()
    except RuntimeError:
        if port == 0:
            raise
        print(f"loadsnap demo: port {port} unavailable, using a free port", file=sys.stderr)
        return ServerThread(app, host, 0).start()


def _start_grpc(source: Any, args: argparse.Namespace) -> GrpcServerThread:
    from dp_controller.harness.engine import add_engine_servicers
    from loadsnap.grpc_server import GrpcServerThread

    def setup(server: Any) -> None:
        add_engine_servicers(server, source, args.dp_size)

    return GrpcServerThread(setup, args.host, args.grpc_port).start()


def _add_controller_metrics(app: Any, controller: Controller) -> None:
    collector = app.state.collector
    dispatcher = controller.dispatcher
    n = controller.dp_size
    # Plain reads of counters the controller thread updates: a scrape may see them mid-update.
    collector.add_provider(
        "controller_outstanding_requests",
        "Requests dispatched and not finished yet, per rank.",
        "gauge",
        ("dp_rank",),
        lambda: {(str(r),): float(controller.outstanding[r]) for r in range(n)},
    )
    collector.add_provider(
        "controller_dispatches_total",
        "Requests dispatched by the controller, per rank.",
        "counter",
        ("dp_rank",),
        lambda: {(str(r),): float(controller.dispatched[r]) for r in range(n)},
    )
    if dispatcher.unacknowledged() is not None:
        collector.add_provider(
            "controller_ledger_depth",
            "Dispatches not yet acknowledged by the rank's scheduler.",
            "gauge",
            ("dp_rank",),
            lambda: {(str(r),): float(c) for r, c in enumerate(dispatcher.unacknowledged() or ())},
        )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit status 0 after a clean stop, 1 when a part failed."""
    from dp_controller.cli import budget_config, make_dispatcher
    from dp_controller.controller import Controller
    from dp_controller.harness.engine import engine_app
    from dp_controller.harness.fleet import SchedulerFleet, claim_instance
    from loadsnap._lockfile import LockFile
    from loadsnap.collector import Collector
    from loadsnap.errors import LoadsnapError
    from loadsnap.shm_reader import ShmReader

    interactive = sys.stdout.isatty() and sys.stdin.isatty()
    duration = args.duration_s
    if duration is None and not interactive:
        duration = NON_INTERACTIVE_DURATION_S
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    lock: LockFile | None = None
    fleet: SchedulerFleet | None = None
    controller: Controller | None = None
    server: ServerThread | None = None
    grpc_server: GrpcServerThread | None = None
    workload: _Workload | None = None
    collector: Collector | None = None
    status = 0
    try:
        # First of all: a second deployment of this instance fails here, having touched nothing.
        lock = claim_instance(args.instance)
        extra_args: list[str] = []
        if args.transport == "zmq":
            collector = Collector(args.instance, args.dp_size, "tcp://127.0.0.1:*")
            extra_args = ["--transport", "zmq", "--collector", collector.endpoint]
            print(f"loadsnap demo: collector on {collector.endpoint} (open channel, loopback)")
        print(f"loadsnap demo: starting {args.dp_size} schedulers (instance {args.instance})")
        fleet = SchedulerFleet(args.instance, args.dp_size, extra_args, lock=lock)
        fleet.wait_ready()
        with ShmReader(args.instance, stale_after_s=args.stale_after_s) as reader:
            dispatcher = make_dispatcher(args.policy, reader, args.dp_size, budget_config(args))
            controller = Controller(dispatcher, fleet.request_addrs, fleet.result_addr)
            app = engine_app(
                args.dp_size,
                args.instance,
                const_labels={"instance": args.instance},
                stale_after_s=args.stale_after_s,
            )
            _add_controller_metrics(app, controller)
            server = _start_server(app, args.host, args.port)
            base = server.url
            print(f"loadsnap demo: {base}/v1/loads", flush=True)
            print(f"loadsnap demo: {base}/v1/loads?format=prometheus", flush=True)
            print(f"loadsnap demo: {base}/metrics  {base}/healthz", flush=True)
            if args.grpc_port is not None:
                grpc_server = _start_grpc(app.state.source, args)
                print(f"loadsnap demo: grpc://{grpc_server.target} (fake engine)", flush=True)
            print(f"loadsnap demo: loadsnap top --instance {args.instance}", flush=True)
            workload = _Workload(controller, args)
            workload.thread.start()
            _show(args, reader, workload, fleet, duration, interactive and not args.no_table)
            if workload.error is not None:
                raise workload.error
    except KeyboardInterrupt:
        pass
    except (LoadsnapError, OSError, RuntimeError) as exc:
        print(f"loadsnap demo: {exc}", file=sys.stderr)
        status = 1
    finally:
        if workload is not None:
            workload.stop.set()
            workload.thread.join(10.0)
        if controller is not None:
            controller.close()
        if grpc_server is not None:
            grpc_server.stop()
        if server is not None:
            server.stop()
        if collector is not None:
            collector.close()
        # Last, so that a new deployment of the instance finds nothing of this one.
        if fleet is not None:
            fleet.close()  # releases the deployment lock
        elif lock is not None:
            lock.release(remove=True)
        signal.signal(signal.SIGTERM, previous)
        if fleet is not None:
            done = (
                f"; {workload.submitted} dispatched, {workload.finished} finished, "
                f"{workload.failed} failed"
                if workload
                else ""
            )
            print(f"loadsnap demo: stopped{done}", flush=True)
    return status


def _show(
    args: argparse.Namespace,
    reader: Any,
    workload: _Workload,
    fleet: SchedulerFleet,
    duration: float | None,
    live_table: bool,
) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from loadsnap.exposition import render_table

    deadline = None if duration is None else time.monotonic() + duration
    exits: dict[int, str] = {}  # ranks whose scheduler exited, and why (the controller goes on)

    def new_exits() -> list[str]:
        fresh = {r: why for r, why in fleet.exited().items() if r not in exits}
        exits.update(fresh)
        return [f"loadsnap demo: {why}" for why in fresh.values()]

    title = f"loadsnap demo: {args.instance} ({args.dp_size} ranks, policy {args.policy})"

    def frame() -> Group:
        new_exits()
        footer = Text(
            f"dispatched {workload.submitted}  finished {workload.finished}  "
            f"failed {workload.failed}  " + ("Ctrl-C to stop" if deadline is None else "")
        )
        notes = [Text(why, style="red") for why in exits.values()]
        return Group(render_table(reader.read_all(), title), footer, *notes)

    def running() -> bool:
        alive = not workload.stop.is_set()
        return alive and (deadline is None or time.monotonic() < deadline)

    if live_table:
        with Live(frame(), console=Console(), auto_refresh=False) as live:
            while running():
                time.sleep(0.25)
                live.update(frame(), refresh=True)
        return
    next_status = time.monotonic() + STATUS_EVERY_S
    while running():
        time.sleep(0.1)
        for line in new_exits():
            print(line, file=sys.stderr, flush=True)
        if time.monotonic() >= next_status:
            next_status += STATUS_EVERY_S
            reads = reader.read_all()
            ranks = " ".join(
                f"r{r.rank}:{r.status.label}:{r.snapshot.num_running_reqs if r.snapshot else '-'}"
                for r in reads
            )
            print(
                f"loadsnap demo: dispatched {workload.submitted} finished {workload.finished} "
                f"failed {workload.failed} {ranks}",
                flush=True,
            )
