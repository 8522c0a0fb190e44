"""The JSON body of ``GET /v1/loads``: the document model (:mod:`._document`), encoded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import msgspec

from loadsnap.exposition._document import build_document
from loadsnap.reading import SlotRead, SlotStatus

__all__ = ["USABLE_STATUSES", "render_json"]

# Ranks whose writer is alive (fresh or stale): what /healthz counts. Routers see fewer ranks:
# see ``ROUTABLE_STATUSES``.
USABLE_STATUSES: Final[frozenset[SlotStatus]] = frozenset({SlotStatus.FRESH, SlotStatus.STALE})


def render_json(
    reads: Iterable[SlotRead],
    include: str | Iterable[str] = "all",
    now: float = 0.0,
    *,
    version: str = "",
) -> dict[str, Any]:
    """Render reads as the ``/v1/loads`` JSON document, as plain Python objects.

    The shape is sglang's (``timestamp``, ``version``, ``dp_rank_count``, ``loads``,
    ``aggregate``) plus ``unavailable``; see :class:`~loadsnap.exposition.LoadsDocument` and
    :func:`~loadsnap.exposition.build_document` for which ranks appear where.

    Raises
    ------
    UsageError
        An unknown section in ``include``; the message lists the valid ones.
    """
    document = build_document(reads, include, now, version=version)
    builtins: dict[str, Any] = msgspec.to_builtins(document)
    return builtins
