"""Building :class:`~loadsnap.HotTable` s from what a reader accepted (a ``RankCache``).

Transport layer, used by :class:`~loadsnap.ShmReader` only. The parts of a table that change
only when a rank changes (the columns, ``valid``, the statuses of ranks that cannot have aged
yet) are kept as read-only arrays that successive tables share until a rank changes; each
table then costs one array for the ages, and the statuses again only once some rank may have
aged past FRESH. A small deployment keeps one 96-byte entry per rank in a ``bytearray``,
rewrites the entries of the ranks that changed in plain Python, and hands numpy one buffer
(one structured array, a view per column); a larger one rebuilds its parts with numpy
operations over every rank.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from loadsnap._readcache import RankCache
from loadsnap.layout import HOT_DTYPE, HOT_FIELDS, HOT_RECORD_SIZE
from loadsnap.reading import HotTable, SlotStatus

__all__ = [
    "FOREVER_NS",
    "LargeTable",
    "SmallTable",
    "TableParts",
    "TableSource",
    "aged_status",
    "hot_table",
    "table_age",
]

FOREVER_NS: Final[int] = 2**62
_NAMES: Final[tuple[str, ...]] = tuple(name for name, _ in HOT_FIELDS)
_ZERO_HOT: Final[bytes] = bytes(HOT_RECORD_SIZE)
# A small deployment's entry per rank: the hot record, then what the table derives from it.
_TAIL_NAMES: Final[tuple[str, ...]] = ("neg_publish_s", "status", "valid", "live")
_TAIL: Final = struct.Struct("<dB??")
_ENTRY_SIZE: Final[int] = 96
_HOT_SPECS: Final = HOT_DTYPE.fields
assert _HOT_SPECS is not None
_ENTRY: Final[np.dtype[np.void]] = np.dtype(
    {
        "names": [*_NAMES, *_TAIL_NAMES],
        "formats": [_HOT_SPECS[name][0] for name in _NAMES] + ["<f8", "u1", "?", "?"],
        "offsets": [_HOT_SPECS[name][1] for name in _NAMES]
        + [HOT_RECORD_SIZE, HOT_RECORD_SIZE + 8, HOT_RECORD_SIZE + 9, HOT_RECORD_SIZE + 10],
        "itemsize": _ENTRY_SIZE,
    }
)
assert _TAIL.size <= _ENTRY_SIZE - HOT_RECORD_SIZE


class TableParts(NamedTuple):
    """What successive hot tables share while no rank changes (read-only arrays)."""

    columns: dict[str, npt.NDArray[np.generic]]
    valid: npt.NDArray[np.bool_]
    neg_publish_s: npt.NDArray[np.float64]  # minus the publish time, in s; NaN if not valid
    live: npt.NDArray[np.bool_]  # valid with a writer attached: age decides the status
    status: npt.NDArray[np.uint8]  # with every live rank FRESH
    fresh_until_ns: int  # before then, no live rank can be anything but FRESH
    latest_publish_ns: int  # ages need clamping at 0 before then (a relayed clock ahead)


class TableSource(Protocol):
    """Keeps a reader's table parts up to date with its ``RankCache``."""

    def parts(self, cache: RankCache) -> TableParts:
        """The current parts (rebuilt from the ranks in ``cache.table_touched``)."""
        ...


def _frozen(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    array.flags.writeable = False
    return array


class SmallTable:
    """Table parts kept rank by rank in plain Python. Not thread-safe.

    Parameters
    ----------
    dp_size:
        Number of ranks.
    fresh_ns:
        How long after its publish a live rank cannot be anything but FRESH.
    """

    def __init__(self, dp_size: int, fresh_ns: int) -> None:
        self._fresh_ns = fresh_ns
        self._entries = bytearray(dp_size * _ENTRY_SIZE)
        self._fresh_until = [FOREVER_NS] * dp_size
        self._published = [0] * dp_size
        self._parts: TableParts | None = None

    def parts(self, cache: RankCache) -> TableParts:
        """The current parts: the entries of the ranks that changed are rewritten first."""
        touched = cache.table_touched
        parts = self._parts
        if parts is not None and not touched:
            return parts
        entries, fresh_until, published = self._entries, self._fresh_until, self._published
        pids, torn, invalid, fresh_ns = cache.pids(), cache.torn, cache.invalid, self._fresh_ns
        pack_tail = _TAIL.pack_into
        for rank in touched:
            at = rank * _ENTRY_SIZE
            seq, _, publish_ns = cache.hot_head(rank)
            fresh_until[rank], published[rank] = FOREVER_NS, 0
            if not seq or rank in invalid:
                if not seq:
                    status = SlotStatus.TORN if rank in torn else SlotStatus.NEVER_PUBLISHED
                else:
                    status = SlotStatus.INVALID
                entries[at : at + HOT_RECORD_SIZE] = _ZERO_HOT
                pack_tail(entries, at + HOT_RECORD_SIZE, math.nan, status, False, False)
                continue
            entries[at : at + HOT_RECORD_SIZE] = cache.hot_record(rank)
            live = pids[rank] != 0
            status = SlotStatus.FRESH if live else SlotStatus.DEAD
            pack_tail(entries, at + HOT_RECORD_SIZE, publish_ns * -1e-9, status, True, live)
            published[rank] = publish_ns
            if live:
                fresh_until[rank] = publish_ns + fresh_ns
        touched.clear()
        rows = np.frombuffer(bytes(entries), _ENTRY)  # over bytes: read-only
        self._parts = parts = TableParts(
            {name: rows[name] for name in _NAMES},
            rows["valid"],
            rows["neg_publish_s"],
            rows["live"],
            rows["status"],
            min(fresh_until),
            max(published),
        )
        return parts


class LargeTable:
    """Table parts rebuilt with numpy over every rank whenever any changed. Not thread-safe.

    Parameters
    ----------
    fresh_ns:
        How long after its publish a live rank cannot be anything but FRESH.
    """

    def __init__(self, fresh_ns: int) -> None:
        self._fresh_ns = fresh_ns
        self._parts: TableParts | None = None

    def parts(self, cache: RankCache) -> TableParts:
        """The current parts, rebuilt if any rank changed."""
        if self._parts is None or cache.table_touched:
            cache.table_touched.clear()
            self._parts = _build_large(cache, self._fresh_ns)
        return self._parts


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
