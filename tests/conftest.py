"""Shared fixtures: every test gets its own instance name and leaves no segment behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from loadsnap import SegmentError, SegmentInUseError, segment_path, unlink_segment


@pytest.fixture
def instance() -> Iterator[str]:
    """A unique instance name; its segment and lock file are removed after the test.

    A writer the test left attached fails the test (``SegmentInUseError``); a hostile file a
    test planted at the segment's path (a FIFO, another owner's file) is removed by hand.
    """
    name = f"t-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        unlink_segment(name)
    except SegmentInUseError:
        raise
    except SegmentError:
        path = segment_path(name)
        for leftover in (path, path + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    os.rmdir(leftover)
                else:
                    os.unlink(leftover)
