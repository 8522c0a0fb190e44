"""What one controller has outstanding per rank, by output-length class (``LENGTH_AWARE``).

See :mod:`dp_controller.budget` for the policy that reads it.
"""

from __future__ import annotations

import logging
from typing import Final

import numpy as np
import numpy.typing as npt

from loadsnap.errors import UsageError

__all__ = ["N_LENGTH_CLASSES", "Outstanding", "length_class"]

log = logging.getLogger("dp_controller")

# Output-length classes: 0 for an unknown bound, else 1 + ceil(log2(max_new_tokens)).
N_LENGTH_CLASSES: Final[int] = 66

_I64 = npt.NDArray[np.int64]


def length_class(max_new_tokens: int | None) -> int:
    """The output-length class of a request: ``0`` when its bound is unknown, else
    ``1 + ceil(log2(max_new_tokens))`` (1: one token, 2: two, 3: 3-4, 4: 5-8, ..., 7: 33-64,
    8: 65-128), capped at ``N_LENGTH_CLASSES - 1``."""
    if max_new_tokens is None or max_new_tokens < 1:
        return 0
    return min((max_new_tokens - 1).bit_length() + 1, N_LENGTH_CLASSES - 1)


class Outstanding:
    """Per rank, the requests dispatched and not yet completed, by output-length class.

    The budget records each dispatch (:meth:`record`); the controller reports each result,
    successful or failed (:meth:`DPBudget.complete`). A completion is matched on
    ``(rank, dispatch seq)``: one that matches nothing (reported twice, dropped by a reset,
    never recorded) changes nothing, so every count is exactly the recorded entries not yet
    completed (never negative). At most ``max_per_rank`` entries are kept per rank: beyond it
    the oldest is forgotten (counted in :attr:`forgotten`), so a caller that never reports
    completions does not grow memory without bound. Single owner; not thread-safe.

    Attributes
    ----------
    count, prompt_tokens:
        Per rank: outstanding requests and the sum of their prompt tokens.
    by_class:
        Per rank, ``N_LENGTH_CLASSES`` outstanding counts indexed by :func:`length_class`.
    arrays:
        With ``arrays=True``, the same numbers as numpy arrays ``(count, prompt_tokens,
        by_class)`` of shapes ``(n,)``, ``(n,)``, ``(n, N_LENGTH_CLASSES)``, kept in step (for
        the vectorised decisions of large deployments); else ``None``. Read-only for callers.
    forgotten:
        Entries dropped because their rank already held ``max_per_rank``.
    """

    __slots__ = (
        "_entries",
        "arrays",
        "by_class",
        "count",
        "forgotten",
        "max_per_rank",
        "prompt_tokens",
    )

    def __init__(self, dp_size: int, max_per_rank: int = 16_384, *, arrays: bool = False) -> None:
        if dp_size < 1 or max_per_rank < 1:
            raise UsageError(
                f"need dp_size >= 1 and max_per_rank >= 1: dp_size={dp_size} "
                f"max_per_rank={max_per_rank}"
            )
        self.max_per_rank = max_per_rank
        self.count = [0] * dp_size
        self.prompt_tokens = [0] * dp_size
        self.by_class = [[0] * N_LENGTH_CLASSES for _ in range(dp_size)]
        self._entries: list[dict[int, tuple[int, int]]] = [{} for _ in range(dp_size)]
        self.forgotten = 0
        self.arrays: tuple[_I64, _I64, _I64] | None = None
        if arrays:
            self.arrays = (
                np.zeros(dp_size, dtype=np.int64),
                np.zeros(dp_size, dtype=np.int64),
                np.zeros((dp_size, N_LENGTH_CLASSES), dtype=np.int64),
            )

    def record(self, rank: int, seq: int, cls: int, prompt_tokens: int) -> None:
        """Count dispatch ``seq`` of ``rank`` (class ``cls``, ``prompt_tokens``) as outstanding.

        A ``seq`` already outstanding on ``rank`` is replaced (the ledger never reuses one)."""
        entries = self._entries[rank]
        if seq in entries:
            self._drop(rank, seq)
        elif len(entries) >= self.max_per_rank:
            self._drop(rank, next(iter(entries)))
            if not self.forgotten:
                log.warning(
                    "length_aware: dp_rank=%d holds max_per_rank=%d outstanding requests; "
                    "forgetting the oldest (are completions reported with DPBudget.complete?)",
                    rank,
                    self.max_per_rank,
                )
            self.forgotten += 1
        entries[seq] = (cls, prompt_tokens)
        self.count[rank] += 1
        self.prompt_tokens[rank] += prompt_tokens
        self.by_class[rank][cls] += 1
        if self.arrays is not None:
            count, prompts, by_class = self.arrays
            count[rank] += 1
            prompts[rank] += prompt_tokens
            by_class[rank, cls] += 1

    def complete(self, rank: int, seq: int) -> bool:
        """Stop counting dispatch ``seq`` of ``rank``; False when it was not outstanding."""
        if not 0 <= rank < len(self._entries) or seq not in self._entries[rank]:
            return False
        self._drop(rank, seq)
        return True

    def _drop(self, rank: int, seq: int) -> None:
        cls, prompt = self._entries[rank].pop(seq)
        self.count[rank] -= 1
        self.prompt_tokens[rank] -= prompt
        self.by_class[rank][cls] -= 1
        if self.arrays is not None:
            count, prompts, by_class = self.arrays
            count[rank] -= 1
            prompts[rank] -= prompt
            by_class[rank, cls] -= 1

    def reset_rank(self, rank: int) -> int:
        """Forget everything outstanding on ``rank`` (its scheduler restarted); return how many
        entries were dropped. Their completions, reported later, match nothing."""
        entries = self._entries[rank]
        dropped = len(entries)
        entries.clear()
        self.count[rank] = 0
        self.prompt_tokens[rank] = 0
        self.by_class[rank] = [0] * N_LENGTH_CLASSES
        if self.arrays is not None:
            for array in self.arrays:
                array[rank] = 0
        return dropped

    def seqs(self, rank: int) -> list[int]:
        """The outstanding dispatch sequences of ``rank``, oldest first."""
        return list(self._entries[rank])
