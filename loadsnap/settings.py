"""loadsnap's environment: every ``LOADSNAP_*`` variable, read and checked in one place.

The only module of loadsnap (and of the packages built on it) that reads ``os.environ``. A
bad value is refused with a :class:`~loadsnap.errors.UsageError` that names the variable,
before anything starts. Explicit arguments always win over the environment; the environment
wins over the defaults here.

======================================  ==========================  ===============================
variable                                default                     meaning
======================================  ==========================  ===============================
``LOADSNAP_INSTANCE``                   ``demo``                    instance name of every command
``LOADSNAP_SHM_DIR``                    ``/dev/shm``                segment directory (must exist)
``LOADSNAP_TRANSPORT``                  ``auto``                    ``shm``, ``zmq`` or ``auto``
``LOADSNAP_COLLECTOR``                  unset                       collector endpoint (writers)
``LOADSNAP_COLLECTOR_BIND``             ``tcp://127.0.0.1:5557``    collector bind endpoint
``LOADSNAP_CURVE_SERVER_KEY``           unset                       writer: the server public key
``LOADSNAP_CURVE_CLIENT_KEY``           unset                       writer: its own secret key
``LOADSNAP_CURVE_DIR``                  unset                       collector: the key directory
``LOADSNAP_PARENT_PID``                 unset                       set by a fleet for its children
``SGLANG_LOAD_SNAPSHOT_USE_ZMQ``        unset                       sglang compat: force ZMQ
======================================  ==========================  ===============================
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from loadsnap.errors import UsageError

__all__ = [
    "DEFAULT_COLLECTOR_BIND",
    "DEFAULT_INSTANCE",
    "PARENT_PID_ENV",
    "TRANSPORTS",
    "Settings",
    "child_environment",
    "current",
    "validate_instance",
]

DEFAULT_INSTANCE: Final[str] = "demo"
DEFAULT_COLLECTOR_BIND: Final[str] = "tcp://127.0.0.1:5557"
TRANSPORTS: Final[tuple[str, ...]] = ("shm", "zmq", "auto")
PARENT_PID_ENV: Final[str] = "LOADSNAP_PARENT_PID"
_INSTANCE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SEGMENT_PREFIX_LEN: Final[int] = len("loadsnap-")
_MACOS_SHM_NAME_MAX: Final[int] = 30


def validate_instance(instance: str) -> str:
    """Return ``instance`` if it is a valid instance name, else raise UsageError.

    1-64 characters of ``A-Z a-z 0-9 _ . -`` starting with a letter or digit: the name becomes
    a file name (``/dev/shm/loadsnap-<instance>``) and part of ipc endpoints.
    """
    if not isinstance(instance, str) or not _INSTANCE_RE.match(instance):
        raise UsageError(
            f"invalid instance name: instance={instance!r}; use 1-64 characters of "
            "A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    if sys.platform == "darwin" and _SEGMENT_PREFIX_LEN + 1 + len(instance) > _MACOS_SHM_NAME_MAX:
        raise UsageError(f"instance name too long for macOS shm: instance={instance!r}")
    return instance


@dataclass(frozen=True)
class Settings:
    """The ``LOADSNAP_*`` environment, checked. Immutable; build it with :func:`current`."""

    instance: str = DEFAULT_INSTANCE
    shm_dir: str | None = None
    transport: str = "auto"
    collector: str | None = None
    collector_bind: str = DEFAULT_COLLECTOR_BIND
    curve_server_key: str | None = None
    curve_client_key: str | None = None
    curve_dir: str | None = None
    parent_pid: int | None = None
    sglang_use_zmq: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Read and check every variable of ``environ``.

        Raises
        ------
        UsageError
            A variable with a bad value; the message names it.
        """

        def text(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        instance = text("LOADSNAP_INSTANCE") or DEFAULT_INSTANCE
        try:
            validate_instance(instance)
        except UsageError as exc:
            raise UsageError(f"LOADSNAP_INSTANCE: {exc}") from None
        transport = (text("LOADSNAP_TRANSPORT") or "auto").lower()
        if transport not in TRANSPORTS:
            raise UsageError(
                f"LOADSNAP_TRANSPORT: unknown transport={transport!r}; "
                f"valid: {', '.join(TRANSPORTS)}"
            )
        return cls(
            instance=instance,
            shm_dir=text("LOADSNAP_SHM_DIR"),
            transport=transport,
            collector=text("LOADSNAP_COLLECTOR"),
            collector_bind=text("LOADSNAP_COLLECTOR_BIND") or DEFAULT_COLLECTOR_BIND,
            curve_server_key=text("LOADSNAP_CURVE_SERVER_KEY"),
            curve_client_key=text("LOADSNAP_CURVE_CLIENT_KEY"),
            curve_dir=text("LOADSNAP_CURVE_DIR"),
            parent_pid=_parent_pid(text(PARENT_PID_ENV)),
            sglang_use_zmq=_flag(text("SGLANG_LOAD_SNAPSHOT_USE_ZMQ")),
        )


def _parent_pid(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        pid = int(raw)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise UsageError(f"{PARENT_PID_ENV} must be a positive pid: got={raw!r}")
    return pid


def _flag(raw: str | None) -> bool:
    # sglang's boolean environment convention: "1"/"true"/"yes"/"on" (any case) turn it on.
    return raw is not None and raw.lower() in ("1", "true", "yes", "on")


def current() -> Settings:
    """The settings of this process's environment now (read afresh each call)."""
    return Settings.from_environ(os.environ)


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment with ``overrides``, for a child process."""
    env = dict(os.environ)
    env.update(overrides)
    return env
