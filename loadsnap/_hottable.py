"""Building :class:`~loadsnap.HotTable` s from what a reader accepted (a ``RankCache``).

Transport layer, used by :class:`~loadsnap.ShmReader` only. The parts of a table that change
only when a rank changes (the columns, ``valid``, the statuses of ranks that cannot have aged
yet) are built once per cache generation, as read-only arrays that successive tables share;
each table then costs one array for the ages, and the statuses again only once some rank may
have aged past FRESH. Small deployments build the parts in plain Python and hand numpy one
buffer per array; larger ones build them with numpy operations.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from loadsnap._readcache import RankCache
from loadsnap.layout import HOT_DTYPE, HOT_FIELDS, HOT_RECORD_SIZE
from loadsnap.reading import HotTable, SlotStatus

__all__ = ["FOREVER_NS", "TableParts", "aged_status", "build_parts", "hot_table", "table_age"]

FOREVER_NS: Final[int] = 2**62
_NAMES: Final[tuple[str, ...]] = tuple(name for name, _ in HOT_FIELDS)
_PUBLISH: Final = struct.Struct("<Q")
_PUBLISH_OFFSET: Final[int] = HOT_DTYPE.fields["publish_mono_ns"][1]  # type: ignore[index]
_ZERO_HOT: Final[bytes] = bytes(HOT_RECORD_SIZE)


class TableParts(NamedTuple):
    """What successive hot tables share while no rank changes (read-only arrays)."""

    generation: int
    columns: dict[str, npt.NDArray[np.generic]]
    valid: npt.NDArray[np.bool_]
    neg_publish_s: npt.NDArray[np.float64]  # minus the publish time, in s; NaN if not valid
    live: npt.NDArray[np.bool_]  # valid with a writer attached: age decides the status
    status: npt.NDArray[np.uint8]  # with every live rank FRESH
    fresh_until_ns: int  # before then, no live rank can be anything but FRESH
    latest_publish_ns: int  # ages need clamping at 0 before then (a relayed clock ahead)


def _frozen(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    array.flags.writeable = False
    return array


def build_parts(cache: RankCache, fresh_ns: int) -> TableParts:
    """The shared parts of ``cache``'s hot tables; live ranks stay FRESH for ``fresh_ns``."""
    if cache.small:
        return _build_small(cache, fresh_ns)
    return _build_large(cache, fresh_ns)


def _build_small(cache: RankCache, fresh_ns: int) -> TableParts:
    dp = cache.dp_size
    hot = bytearray(cache.hot_bytes())
    accepted, pids, torn, invalid = cache.accepted(), cache.pids(), cache.torn, cache.invalid
    status = bytearray(dp)  # SlotStatus.FRESH is 0
    valid = bytearray(dp)
    live = bytearray(dp)
    neg_publish_s = [math.nan] * dp
    fresh_until, latest = FOREVER_NS, 0
    unpack = _PUBLISH.unpack_from
    for rank in range(dp):
        if not accepted[rank]:
            status[rank] = SlotStatus.TORN if rank in torn else SlotStatus.NEVER_PUBLISHED
            continue
        at = rank * HOT_RECORD_SIZE
        if rank in invalid:
            status[rank] = SlotStatus.INVALID
            hot[at : at + HOT_RECORD_SIZE] = _ZERO_HOT
            continue
        valid[rank] = 1
        publish_ns = unpack(hot, at + _PUBLISH_OFFSET)[0]
        neg_publish_s[rank] = publish_ns * -1e-9
        latest = max(latest, publish_ns)
        if pids[rank] == 0:
            status[rank] = SlotStatus.DEAD
        else:
            live[rank] = 1
            fresh_until = min(fresh_until, publish_ns + fresh_ns)
    rows = np.frombuffer(bytes(hot), HOT_DTYPE)  # over bytes: read-only
    return TableParts(
        cache.generation,
        {name: rows[name] for name in _NAMES},
        np.frombuffer(bytes(valid), np.bool_),
        _frozen(np.array(neg_publish_s)),  # type: ignore[arg-type]
        np.frombuffer(bytes(live), np.bool_),
        np.frombuffer(bytes(status), np.uint8),
        fresh_until,
        latest,
    )


def _build_large(cache: RankCache, fresh_ns: int) -> TableParts:
    rows = cache.hot_words().view(HOT_DTYPE).reshape(cache.dp_size)
    accepted = rows["seq"] != 0
    valid = accepted.copy()
    status = np.zeros(valid.shape, dtype=np.uint8)  # SlotStatus.FRESH is 0
    status[~accepted] = SlotStatus.NEVER_PUBLISHED
    if cache.torn:
        status[list(cache.torn)] = SlotStatus.TORN
    if cache.invalid:
        refused = list(cache.invalid)
        valid[refused] = False
        status[refused] = SlotStatus.INVALID
        rows[refused] = np.zeros(1, HOT_DTYPE)
    detached = valid & (cache.control_rows()["writer_pid"] == 0)
    status[detached] = SlotStatus.DEAD
    live = valid & ~detached
    publish_ns = rows["publish_mono_ns"]
    neg_publish_s = np.where(valid, publish_ns * -1e-9, np.nan)
    fresh_until = int(publish_ns[live].min()) + fresh_ns if live.any() else FOREVER_NS
    latest = int(publish_ns.max())
    _frozen(rows)
    return TableParts(
        cache.generation,
        {name: rows[name] for name in _NAMES},
        _frozen(valid),  # type: ignore[arg-type]
        _frozen(neg_publish_s),  # type: ignore[arg-type]
        _frozen(live),  # type: ignore[arg-type]
        _frozen(status),  # type: ignore[arg-type]
        fresh_until,
        latest,
    )


def aged_status(
    parts: TableParts,
    age_s: npt.NDArray[np.float64],
    pids: list[int],
    alive: Callable[[int, int], bool],
    stale_after_s: float,
    probe_after_s: float,
) -> npt.NDArray[np.uint8]:
    """The statuses once some live rank may have aged past FRESH: older than
    ``probe_after_s``, its writer is probed (``alive(rank, pid)``); older than
    ``stale_after_s``, it is STALE (as :meth:`ShmReader.read` decides)."""
    status = parts.status.copy()
    old = parts.live & (age_s > min(stale_after_s, probe_after_s))
    for rank in np.flatnonzero(old).tolist():
        age = float(age_s[rank])
        if age > probe_after_s and not alive(rank, pids[rank]):
            status[rank] = SlotStatus.DEAD
        elif age > stale_after_s:
            status[rank] = SlotStatus.STALE
    status.flags.writeable = False
    return status


def table_age(parts: TableParts, now_ns: int) -> npt.NDArray[np.float64]:
    """Every rank's age at ``now_ns`` in seconds (NaN where not valid), never negative."""
    age = np.add(parts.neg_publish_s, now_ns * 1e-9)
    if now_ns < parts.latest_publish_ns:
        np.maximum(age, 0.0, out=age)
    return age


def hot_table(
    parts: TableParts,
    now_ns: int,
    age_s: npt.NDArray[np.float64],
    status: npt.NDArray[np.uint8],
) -> HotTable:
    """The table taken at ``now_ns``."""
    return HotTable(
        now_ns,
        valid=parts.valid,
        status=status,
        age_s=age_s,
        **parts.columns,  # type: ignore[arg-type]
    )
