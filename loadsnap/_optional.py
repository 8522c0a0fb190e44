"""Optional dependencies: which are missing, and the one-line hint that says how to get them."""

from __future__ import annotations

import importlib.util
from typing import Final

__all__ = ["GRPC_HINT", "missing_grpc"]

GRPC_HINT: Final[str] = (
    "loadsnap's gRPC servicers need grpcio and smg-grpc-proto: pip install 'loadsnap[grpc]'"
)


def missing_grpc() -> str | None:
    """The first of grpcio / smg-grpc-proto that cannot be imported here, or None."""
    for module, package in (("grpc", "grpcio"), ("smg_grpc_proto", "smg-grpc-proto")):
        try:
            if importlib.util.find_spec(module) is None:
                return package
        except (ImportError, ValueError):  # a parent package or a None entry in sys.modules
            return package
    return None
