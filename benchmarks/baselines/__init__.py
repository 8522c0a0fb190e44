"""Competitor designs re-implemented for side-by-side comparison in the benchmarks.

Not part of loadsnap: each module reproduces a design users would otherwise run, faithfully
enough that its costs (locks, decodes, copies) are the ones that design pays.
"""

from __future__ import annotations

from benchmarks.baselines.flock_segment import FlockSegment, ReferenceSnapshot, reference_snapshot

__all__ = ["FlockSegment", "ReferenceSnapshot", "reference_snapshot"]
