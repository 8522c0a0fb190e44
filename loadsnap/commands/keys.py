"""``loadsnap keys generate DIR``: CURVE key pairs for the ZMQ collector and its writers."""

from __future__ import annotations

import argparse
import sys

from loadsnap import flags
from loadsnap.curve import CLIENTS_DIR, MAX_CLIENTS, client_ranks, generate_keys
from loadsnap.errors import LoadsnapError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys`` subcommand."""
    parser = subparsers.add_parser(
        "keys",
        help="generate CURVE keys for the ZMQ transport",
        description="Manage CURVE keys that authenticate and encrypt ZMQ snapshots.",
    )
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    generate = actions.add_parser(
        "generate",
        help="write a server key pair and N client key pairs into DIR",
        description=(
            "Write DIR/server.key (public: copy to every writer node), DIR/server.key_secret "
            f"(collector node only), and DIR/{CLIENTS_DIR}/client-NNN.key (public: the "
            f"collector's allow-list) + client-NNN.key_secret (one per writer node). "
            "Each client certificate binds its key to the ranks it may publish "
            '(metadata ranks = "0-3", or "*" for any rank); the collector drops a frame for '
            "any other rank. Secret files are mode 0600; existing files are never overwritten."
        ),
    )
    generate.add_argument("dir", metavar="DIR", help="output directory (created, mode 0700)")
    generate.add_argument(
        "--clients",
        type=flags.positive_count,
        default=1,
        metavar="N",
        help=f"number of client key pairs, 1..{MAX_CLIENTS} (default 1)",
    )
    generate.add_argument(
        "--ranks-per-client",
        type=flags.positive_count,
        default=None,
        metavar="K",
        help="bind client i to ranks i*K..i*K+K-1 (one key per node of K ranks); "
        'default: every key may publish any rank (ranks = "*")',
    )
    generate.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Generate the keys and list the files written; exit status 1 on failure."""
    try:
        written = generate_keys(
            args.dir, clients=args.clients, ranks_per_client=args.ranks_per_client
        )
    except LoadsnapError as exc:
        print(f"loadsnap keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"server public  {written.server_public}")
    print(f"server secret  {written.server_secret}  (collector node only)")
    for index, path in enumerate(written.client_secrets):
        ranks = client_ranks(index, args.ranks_per_client)
        print(f"client secret  {path}  (one writer node; ranks {ranks})")
    if args.ranks_per_client is None:
        print(
            'note: every client key may publish any rank (ranks = "*"); bind keys to ranks with '
            f"--ranks-per-client K, or edit ranks in DIR/{CLIENTS_DIR}/*.key"
        )
    print(
        "collector: loadsnap collector --curve-dir DIR ...; writers: "
        "LOADSNAP_CURVE_SERVER_KEY=DIR/server.key LOADSNAP_CURVE_CLIENT_KEY=<client secret>"
    )
    return 0
