"""Command-line flags shared by every command, each declared once, checked at parse time.

Every command (the library's and those plugged in above it) builds its parser from these
pieces, so a flag has one name, one default, one help text and one check everywhere. The
naming rule for units: a flag holding a quantity ends in its unit (``--stale-after-s``,
``--duration-s``, ``--rate-rps``, ``--refresh-interval-ms``). A bad value is refused by
argparse before anything starts, with one line on stderr and exit status 2
(:class:`OneLineParser`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from loadsnap import settings
from loadsnap._location import check_shm_dir
from loadsnap._optional import GRPC_HINT, missing_grpc
from loadsnap.errors import UsageError
from loadsnap.layout import MAX_DP_SIZE
from loadsnap.reading import DEFAULT_STALE_AFTER_S

__all__ = [
    "MAX_SPAWNED_RANKS",
    "OneLineParser",
    "add_dp_size",
    "add_duration",
    "add_grpc_port",
    "add_host_port",
    "add_instance",
    "add_json",
    "add_log_level",
    "add_reader_options",
    "add_shm_dir",
    "add_stale_after",
    "add_transport",
    "count",
    "grpc_port_number",
    "instance_name",
    "non_negative_number",
    "port_number",
    "positive_count",
    "positive_number",
    "ratio",
    "shm_directory",
]

# Commands that start one process per rank refuse more than this many.
MAX_SPAWNED_RANKS = 256
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- value checks (argparse ``type=`` callables) -------------------------------------------


def _checked(convert: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Any:
    def check(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    check.__name__ = what  # argparse names the type in some messages
    return check


def _finite(value: float) -> bool:
    return math.isfinite(value)


positive_number = _checked(float, lambda v: _finite(v) and v > 0, "a positive number")
non_negative_number = _checked(float, lambda v: _finite(v) and v >= 0, "a number >= 0")
ratio = _checked(float, lambda v: 0.0 <= v <= 1.0, "a ratio in 0..1")
positive_count = _checked(int, lambda v: v >= 1, "an integer >= 1")
count = _checked(int, lambda v: v >= 0, "an integer >= 0")
port_number = _checked(int, lambda v: 0 <= v <= 65535, "a port in 0..65535")


def grpc_port_number(text: str) -> int:
    """argparse ``type`` for ``--grpc-port``: a port, and the gRPC extra installed."""
    port: int = port_number(text)
    missing = missing_grpc()
    if missing is not None:
        raise argparse.ArgumentTypeError(f"{GRPC_HINT} ({missing} is not installed)")
    return port


def instance_name(text: str) -> str:
    """argparse ``type`` for an instance name."""
    try:
        return settings.validate_instance(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def shm_directory(text: str) -> str:
    """argparse ``type`` for ``--shm-dir``: an existing directory, never created."""
    try:
        check_shm_dir(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _dp_size(limit: int, why: str) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"{value} is not in 1..{limit} ({why})")
        return value

    return check


# --- the flags ------------------------------------------------------------------------------


def add_instance(parser: argparse.ArgumentParser | Any, *, required: bool = False) -> None:
    """``--instance NAME`` (default ``$LOADSNAP_INSTANCE``, else ``demo``)."""
    if required:
        parser.add_argument("--instance", type=instance_name, required=True, help="instance name")
        return
    parser.add_argument(
        "--instance",
        type=instance_name,
        default=settings.current().instance,
        help="deployment instance name (default $LOADSNAP_INSTANCE, else "
        f"{settings.DEFAULT_INSTANCE})",
    )


def add_shm_dir(parser: argparse.ArgumentParser | Any) -> None:
    """``--shm-dir DIR`` (default ``$LOADSNAP_SHM_DIR``, else ``/dev/shm``)."""
    parser.add_argument(
        "--shm-dir",
        type=shm_directory,
        default=None,
        help="directory holding the segment, which must exist (default $LOADSNAP_SHM_DIR, "
        "else /dev/shm)",
    )


def add_stale_after(parser: argparse.ArgumentParser | Any) -> None:
    """``--stale-after-s SECONDS``: the staleness budget."""
    parser.add_argument(
        "--stale-after-s",
        type=positive_number,
        default=DEFAULT_STALE_AFTER_S,
        metavar="SECONDS",
        help=f"a rank older than this is stale (default {DEFAULT_STALE_AFTER_S})",
    )


def add_reader_options(parser: argparse.ArgumentParser | Any) -> None:
    """``--shm-dir`` and ``--stale-after-s``: how a reading command finds and judges a segment."""
    add_shm_dir(parser)
    add_stale_after(parser)


def add_dp_size(
    parser: argparse.ArgumentParser | Any,
    *,
    default: int | None = None,
    spawns: bool = False,
) -> None:
    """``--dp-size N``: 1..65536 ranks, or 1..``MAX_SPAWNED_RANKS`` for commands that start
    one process per rank."""
    limit, why = (
        (MAX_SPAWNED_RANKS, "one process is started per rank")
        if spawns
        else (MAX_DP_SIZE, "the segment's limit")
    )
    if default is None:
        parser.add_argument(
            "--dp-size", type=_dp_size(limit, why), required=True, help="number of DP ranks"
        )
    else:
        parser.add_argument(
            "--dp-size",
            type=_dp_size(limit, why),
            default=default,
            help=f"number of DP ranks (default {default})",
        )


def add_duration(
    parser: argparse.ArgumentParser | Any, *, default: float | None, help: str
) -> None:
    """``--duration-s SECONDS`` (> 0)."""
    parser.add_argument(
        "--duration-s", type=positive_number, default=default, metavar="SECONDS", help=help
    )


def add_host_port(parser: argparse.ArgumentParser | Any, *, port: int, port_help: str) -> None:
    """``--host ADDRESS`` (default loopback) and ``--port N`` (0..65535)."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=port, help=port_help)


def add_grpc_port(parser: argparse.ArgumentParser | Any, *, help: str) -> None:
    """``--grpc-port N``: also serve loadsnap's gRPC servicers there (needs ``loadsnap[grpc]``,
    checked at parse time); default: no gRPC."""
    parser.add_argument(
        "--grpc-port", type=grpc_port_number, default=None, metavar="PORT", help=help
    )


def add_transport(parser: argparse.ArgumentParser | Any, *, help: str) -> None:
    """``--transport {shm,zmq,auto}`` (default ``$LOADSNAP_TRANSPORT``, else ``auto``)."""
    parser.add_argument("--transport", choices=settings.TRANSPORTS, default=None, help=help)


def add_json(parser: argparse.ArgumentParser | Any) -> None:
    """``--json``: machine-readable output."""
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def add_log_level(parser: argparse.ArgumentParser | Any) -> None:
    """``--log-level LEVEL``."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="WARNING",
        help="logging level (default WARNING)",
    )


def exit_quietly_on_broken_pipe() -> None:
    """After stdout's reader went away (``loadsnap inspect | head``): no traceback at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
