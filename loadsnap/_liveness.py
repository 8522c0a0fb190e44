"""Process identity that survives pid reuse: (pid, start time in clock ticks since boot)."""

from __future__ import annotations

import os
import sys
from typing import Final

__all__ = ["process_alive", "process_start_ticks"]


def process_start_ticks(pid: int) -> int:
    """The process's start time from /proc (Linux), or 0 where that is not available."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return 0


# pid_t is a signed 32-bit int: a larger value (from a corrupt slot) names no process.
_PID_MAX: Final[int] = 2**31 - 1


def process_alive(pid: int, start_ticks: int) -> bool:
    """True when ``pid`` runs and, if ``start_ticks`` is known, is the same process."""
    if not 0 < pid <= _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_ticks == 0:
        return True
    current = process_start_ticks(pid)
    if current == 0:
        # Not visible here (another pid namespace) or gone since: trust the signal probe.
        return True
    if current != start_ticks:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3] == b"Z"
