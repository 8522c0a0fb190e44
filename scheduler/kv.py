"""KV-cache token pool and block prefix cache of the reference scheduler. No I/O.

Theory of operation: the pool hands out token *slot indices* (``0 .. capacity-1``), like a
paged KV allocator with a page of one token; an executor that really computes attention (the
``torch`` executor) writes each token's keys and values at its slot. A finished request's full
prompt blocks move into the :class:`PrefixCache` instead of going back to the pool; a later
request whose leading blocks hash the same reuses those slots (``cached_tokens``). A cached block
is *locked* while a running request reads it and *evictable* otherwise; evictable blocks are
reclaimed least-recently-used first when the pool runs dry, so they never count as used.

Block keys form a hash chain, ``key[i] = hash((key[i-1], block_i_tokens))``, so a key names the
whole prefix up to the end of its block, not just one block's tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from loadsnap.errors import UsageError

__all__ = ["KVPool", "PrefixCache", "block_keys"]

_ROOT_KEY = 0x5EED


def block_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """Hash-chain keys of every *full* leading block of ``tokens``."""
    keys: list[int] = []
    parent = _ROOT_KEY
    for end in range(block_size, len(tokens) + 1, block_size):
        parent = hash((parent, tuple(tokens[end - block_size : end])))
        keys.append(parent)
    return keys


class KVPool:
    """A free list of KV token slots. Single-threaded; owned by one engine.

    Parameters
    ----------
    capacity:
        Number of token slots (``max_total_num_tokens``).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise UsageError(f"kv pool capacity must be >= 1: capacity={capacity}")
        self.capacity = capacity
        # A stack: the lowest slots are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(capacity - 1, -1, -1))

    @property
    def free(self) -> int:
        """Slots not held by any request or cached block."""
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take ``n`` slots. Raises UsageError when fewer are free (callers check first)."""
        if n > len(self._free):
            raise UsageError(f"kv pool exhausted: wanted={n} free={len(self._free)}")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        return taken

    def release(self, slots: Sequence[int]) -> None:
        """Give slots back."""
        self._free.extend(reversed(slots))


class _Block:
    __slots__ = ("refs", "slots")

    def __init__(self, slots: list[int]) -> None:
        self.slots = slots
        self.refs = 0


class PrefixCache:
    """Cached prompt blocks keyed by hash chain, with reference counts and LRU eviction.

    Single-threaded; owned by one engine. Holds slots taken from ``pool``.
    """

    def __init__(self, pool: KVPool, block_size: int) -> None:
        if block_size < 1:
            raise UsageError(f"prefix block size must be >= 1: block_size={block_size}")
        self.pool = pool
        self.block_size = block_size
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # LRU order, oldest first
        self._evictable_tokens = 0

    @property
    def cached_tokens(self) -> int:
        """Tokens held by cached blocks (locked or not)."""
        return len(self._blocks) * self.block_size

    @property
    def evictable_tokens(self) -> int:
        """Tokens held by cached blocks no running request reads."""
        return self._evictable_tokens

    def match(self, keys: Sequence[int], max_blocks: int) -> int:
        """Number of leading blocks of ``keys`` present in the cache (at most ``max_blocks``)."""
        count = 0
        blocks = self._blocks
        for key in keys[:max_blocks]:
            if key not in blocks:
                break
            count += 1
        return count

    def lock(self, keys: Sequence[int]) -> list[int]:
        """Pin the cached blocks ``keys`` (all present) and return their slots, in order."""
        slots: list[int] = []
        for key in keys:
            block = self._blocks[key]
            if block.refs == 0:
                self._evictable_tokens -= self.block_size
            block.refs += 1
            slots.extend(block.slots)
        self._touch(keys)
        return slots

    def unlock(self, keys: Sequence[int]) -> None:
        """Unpin blocks pinned by :meth:`lock`."""
        for key in keys:
            block = self._blocks[key]
            block.refs -= 1
            if block.refs == 0:
                self._evictable_tokens += self.block_size

    def insert(self, keys: Sequence[int], slots: Sequence[int]) -> list[int]:
        """Cache blocks ``keys`` whose KV lives at ``slots`` (``block_size`` each, in order).

        Takes ownership of the slots of blocks not cached yet; returns the slots it did not
        need (blocks cached already), which the caller gives back to the pool.
        """
        spare: list[int] = []
        size = self.block_size
        for i, key in enumerate(keys):
            block_slots = list(slots[i * size : (i + 1) * size])
            if key in self._blocks:
                spare.extend(block_slots)
            else:
                self._blocks[key] = _Block(block_slots)
                self._evictable_tokens += size
        self._touch(keys)
        return spare

    def _touch(self, keys: Sequence[int]) -> None:
        # Deepest block first, root last: the root ends most recent, so eviction takes leaves
        # before the prefixes they hang from.
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def evict(self, tokens: int) -> int:
        """Free at least ``tokens`` tokens of evictable blocks, oldest first; return freed."""
        freed = 0
        for key in list(self._blocks):
            if freed >= tokens:
                break
            block = self._blocks[key]
            if block.refs:
                continue
            del self._blocks[key]
            self.pool.release(block.slots)
            self._evictable_tokens -= self.block_size
            freed += self.block_size
        return freed

    def flush(self) -> int:
        """Evict every evictable block; return the tokens freed."""
        return self.evict(self._evictable_tokens)
