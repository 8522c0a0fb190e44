"""``loadsnap serve``: the sidecar HTTP server (``/v1/loads``, ``/metrics``, ``/healthz``)."""

from __future__ import annotations

import argparse
import socket
import sys

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
            "own. GET /v1/loads?dp_rank=&include=&format=json|prometheus, GET /metrics "
            "(loadsnap's own health), GET /healthz (200 while a rank is usable). Binds to "
            "loopback by default: the endpoints have no authentication."
        ),
        epilog="Example: loadsnap serve --instance demo --port 8000 --label model=llama",
    )
    flags.add_instance(parser)
    flags.add_host_port(parser, port=8000, port_help="bind port (default 8000)")
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
    if args.host not in LOOPBACK_HOSTS:
        print(
            f"loadsnap serve: warning: binding {args.host}: /v1/loads and /metrics have no "
            "authentication; put them behind a proxy or a network policy",
            file=sys.stderr,
        )
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{port}"
    print(f"loadsnap serve: instance {args.instance}", flush=True)
    print(f"  {base}/v1/loads  {base}/v1/loads?format=prometheus", flush=True)
    print(f"  {base}/metrics  {base}/healthz", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])  # the socket bound above: no window for another process
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it captured, once it stopped
        pass
    finally:
        sock.close()
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
