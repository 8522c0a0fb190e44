"""``loadsnap serve``: the sidecar HTTP server (``/v1/loads``, ``/metrics``, ``/healthz``)."""

from __future__ import annotations

import argparse
import sys

from loadsnap.commands import add_reader_options
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
    parser.add_argument("--instance", required=True, help="deployment instance name")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="bind port (default 8000)")
    add_reader_options(parser)
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
            stale_after_s=args.stale_after,
            prefix=args.prefix,
            const_labels=parse_labels(args.label),
        )
    except UsageError as exc:
        print(f"loadsnap serve: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK_HOSTS:
        print(
            f"loadsnap serve: warning: binding {args.host}: /v1/loads and /metrics have no "
            "authentication; put them behind a proxy or a network policy",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    print(f"loadsnap serve: instance {args.instance}", flush=True)
    print(f"  {base}/v1/loads  {base}/v1/loads?format=prometheus", flush=True)
    print(f"  {base}/metrics  {base}/healthz", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
