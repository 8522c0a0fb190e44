"""``loadsnap serve``: the sidecar HTTP server (``/v1/loads``, ``/get_load``, ``/metrics``,
``/healthz``) and, with ``--grpc-port``, the gRPC ``GetLoads`` and ``SubscribeKvEvents``."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from loadsnap import flags
from loadsnap.errors import UsageError
from loadsnap.server import LOOPBACK_HOSTS


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve /v1/loads, /metrics and /healthz for a running instance",
        description=(
            "Serve an instance's loads over HTTP, for engines without an HTTP server of their "
            "own. GET /v1/loads?dp_rank=&include=&format=json|prometheus (sglang's document), "
            "GET /get_load (sglang-router 0.3.x), GET /metrics (loadsnap's own health), "
            "GET /healthz (200 while a rank is usable). With --grpc-port, also the gRPC "
            "SglangScheduler GetLoads and SubscribeKvEvents (pushed load). Binds to "
            "loopback by default: the endpoints have no authentication."
        ),
        epilog=(
            "Example: loadsnap serve --instance demo --port 8000 --grpc-port 50051 "
            "--label model=llama"
        ),
    )
    flags.add_instance(parser)
    flags.add_host_port(parser, port=8000, port_help="bind port (default 8000)")
    flags.add_grpc_port(
        parser,
        help="also serve gRPC GetLoads and SubscribeKvEvents on this port, on --host "
        "(needs loadsnap[grpc]; default: no gRPC)",
    )
    flags.add_reader_options(parser)
    parser.add_argument(
        "--prefix",
        default="loadsnap_",
        help="Prometheus metric prefix for /v1/loads (sglang_ reproduces the reference names)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="constant Prometheus label, repeatable (e.g. --label model=llama)",
    )
    parser.set_defaults(func=run)


def parse_labels(items: list[str]) -> dict[str, str]:
    """``["a=b", ...]`` -> ``{"a": "b"}``.

    Raises
    ------
    UsageError
        An item without ``=``.
    """
    labels = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--label: expected NAME=VALUE, found {item!r}")
        labels[name.strip()] = value
    return labels


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn

    from loadsnap.server import create_app

    try:
        app = create_app(
            args.instance,
            shm_dir=args.shm_dir,
            stale_after_s=args.stale_after_s,
            prefix=args.prefix,
            const_labels=parse_labels(args.label),
        )
    except UsageError as exc:
        print(f"loadsnap serve: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:  # before any URL is printed: a busy port is one line, exit 1
        print(
            f"loadsnap serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        # The socket bound above: no window for another process.
        return asyncio.run(_serve(args, app, server, sock))
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it captured, once it stopped
        return 0
    finally:
        sock.close()


async def _serve(args: argparse.Namespace, app: Any, server: Any, sock: socket.socket) -> int:
    grpc_server: Any = None
    grpc_port = None
    if args.grpc_port is not None:  # bound before any URL is printed, like the HTTP port
        from loadsnap.grpc_loads import add_load_servicers
        from loadsnap.grpc_server import PortInUseError, start_grpc_server

        try:
            grpc_server, grpc_port = await start_grpc_server(
                lambda s: add_load_servicers(s, app.state.source), args.host, args.grpc_port
            )
        except PortInUseError as exc:
            print(f"loadsnap serve: --grpc-port: {exc}", file=sys.stderr)
            return 1
    if args.host not in LOOPBACK_HOSTS:
        print(
            f"loadsnap serve: warning: binding {args.host}: /v1/loads, /metrics and gRPC have "
            "no authentication; put them behind a proxy or a network policy",
            file=sys.stderr,
        )
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{port}"
    print(f"loadsnap serve: instance {args.instance}", flush=True)
    print(f"  {base}/v1/loads  {base}/v1/loads?format=prometheus  {base}/get_load", flush=True)
    print(f"  {base}/metrics  {base}/healthz", flush=True)
    if grpc_server is not None:
        print(f"  grpc://{host}:{grpc_port} (GetLoads, SubscribeKvEvents)", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        if grpc_server is not None:
            await grpc_server.stop(1.0)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one), as uvicorn would bind.

    Raises
    ------
    OSError
        The address is in use, not local, or not allowed.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
