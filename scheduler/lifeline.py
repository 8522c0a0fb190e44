"""Children that die with their parent: ``PR_SET_PDEATHSIG``, set by the child itself.

Theory of operation. A parent that spawns schedulers
(``dp_controller.harness.fleet.SchedulerFleet``)
puts its pid in the child's environment as ``LOADSNAP_PARENT_PID`` (:func:`child_env`). The
child, first thing in its entry point, calls :func:`die_with_parent`: it asks the kernel to send
it SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), *then* checks that
``os.getppid()`` is still that pid. A parent that died between the fork and the ``prctl`` would
never trigger the signal (the child was already handed to init or a subreaper), so the check
catches exactly that window and the child refuses to start. SIGTERM is the scheduler's clean
stop: a final publish, the writer closed (the last writer unlinks the segment), exit 0.

Done in the child, not with ``preexec_fn`` (unsafe in a process with threads). Caveats:

* The kernel sends the signal when the *thread* that forked the child exits, not the process:
  spawn from a thread that lives as long as the process (the main thread).
* Linux only. Elsewhere :func:`die_with_parent` does nothing and children outlive a parent
  killed with SIGKILL (a clean stop of the parent still stops them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping
from typing import Final

from loadsnap import settings
from loadsnap.errors import LoadsnapError
from loadsnap.settings import PARENT_PID_ENV

__all__ = ["PARENT_PID_ENV", "OrphanedError", "child_env", "die_with_parent"]

_PR_SET_PDEATHSIG: Final[int] = 1  # <linux/prctl.h>


class OrphanedError(LoadsnapError):
    """The parent named by ``LOADSNAP_PARENT_PID`` died before this process could watch it."""


def child_env(
    parent_pid: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for a child that must die with ``parent_pid`` (default: this process).

    Parameters
    ----------
    parent_pid:
        The process whose death stops the child; default ``os.getpid()``.
    base:
        The environment to extend; default ``os.environ``.
    """
    env = settings.child_environment() if base is None else dict(base)
    env[PARENT_PID_ENV] = str(os.getpid() if parent_pid is None else parent_pid)
    return env


def die_with_parent(environ: Mapping[str, str] | None = None) -> int | None:
    """Arrange SIGTERM at the death of the parent named by ``LOADSNAP_PARENT_PID``.

    Call it first thing in the child's entry point, on its main thread.

    Parameters
    ----------
    environ:
        Where to read ``LOADSNAP_PARENT_PID``; default ``os.environ``.

    Returns
    -------
    int or None
        The parent pid now watched; None when the variable is unset or empty, or on a
        platform without ``PR_SET_PDEATHSIG`` (nothing done).

    Raises
    ------
    UsageError
        The variable is not a positive integer.
    OrphanedError
        The parent is already gone (this process was reparented before it could watch).
    OSError
        ``prctl`` failed.
    """
    env = settings.current() if environ is None else settings.Settings.from_environ(environ)
    parent = env.parent_pid
    if parent is None:
        return None
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    # Only now: a parent that dies after the prctl above is signalled for, one that died
    # before it shows here as another parent (init or a subreaper).
    if os.getppid() != parent:
        raise OrphanedError(
            f"parent pid={parent} exited before this process started ({PARENT_PID_ENV}); "
            "not starting"
        )
    return parent
