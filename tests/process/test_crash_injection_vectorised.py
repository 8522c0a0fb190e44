"""Crash injection (``tests.test_crash_injection``) read back through the numpy paths.

A writer dies at each named step of a publish; readers forced onto the numpy control table and
gathers must then see the previous or the new record whole, as the default readers do.
"""

from __future__ import annotations

import pytest

from loadsnap import ShmReader, ShmWriter, SlotStatus
from tests.test_crash_injection import _EXPECTED, _STOPS, _check_whole, _crash


@pytest.mark.parametrize("stop", list(_STOPS))
def test_numpy_paths_see_a_whole_record_after_a_crash(instance: str, stop: str) -> None:
    with ShmWriter(instance, 2, 1):  # keeps the segment live across the crash
        _crash(instance, 2, stop, "sigkill")
        expected = _EXPECTED[stop]
        for verify_each in (False, True):
            with ShmReader(instance, verify_each=verify_each) as reader:
                reader._small_max = reader._gather_min = 0
                table = reader.hot_table()
                assert bool(table.valid[0]) and int(table.seq[0]) == expected
                assert int(table.num_running_reqs[0]) == 10 * expected
                assert int(table.status[0]) == SlotStatus.DEAD
                _check_whole(reader.read_all()[0], expected, SlotStatus.DEAD)
                _check_whole(reader.read(0), expected, SlotStatus.DEAD)
                assert reader.stats.torn == 0 and reader.stats.decode_errors == 0
