"""Shared fixtures: every test gets its own instance name and leaves no segment behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from loadsnap import unlink_segment


@pytest.fixture
def instance() -> Iterator[str]:
    """A unique instance name; its segment and lock file are removed after the test."""
    name = f"t-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    unlink_segment(name)
