"""The KV pool's bookkeeping: which block belongs to whom, and which hold a reusable prefix.

The pool has ``num_blocks`` blocks of ``block_size`` token slots. A block is in exactly one of:

- **in use**: ``ref_count > 0`` — listed in the block tables of that many sequences;
- **free**: never held a full, cached block (or its cache entry was evicted);
- **evictable**: unused, but it still holds a full block registered in the prefix cache, so a
  later request with the same prefix can take it back without recomputing. When no free block
  is left, the least recently used evictable block is recycled.

**Layer groups** (vLLM's hybrid KV-cache manager). The model's layers come in groups of equal
size that attend alike (``KVCache``): one group for a model whose layers all see the whole
context; for Gemma 3's 5 sliding-window layers to 1 global, several. A block id holds one slot
per layer of *one* group, so every group draws blocks from the same pool, and each sequence has
one block table per group. A group with a sliding window gives its blocks back as soon as every
query still to come attends past them (the table keeps its positions: the entry becomes
``NO_BLOCK``), so it holds about ``window / block_size`` blocks however long the sequence grows,
while full-attention groups keep theirs. Admission and preemption count every group's blocks.

Prefix caching identifies a full block by a SHA-256 digest of its parent block's digest and its
own token ids: chaining makes equal digests mean equal *prefixes*, not just equal blocks. Tenants
share this cache, so a hit must be exact whatever the digest: a hit is verified against the
block's stored token ids *and* its parent's digest, so by induction over the chain the whole
prefix is equal (a collision can cost a miss, never serve another prefix's K/V — the hole vLLM
closed after CVE-2025-25183, where Python's ``hash`` identified blocks). Each group caches its
own blocks under the same digests; a prefix of ``k`` blocks is a hit when every group holds what
its layers read from it: all ``k`` blocks for a full group, the blocks of the last ``window``
tokens for a sliding one. A hybrid model's linear layers need more than K/V to resume: a hit also
needs a snapshot of their state where the prefix ends (``state_snapshots.py``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from pico_vllm.engine.sequence import NO_BLOCK, Sequence
from pico_vllm.engine.state_snapshots import StateSnapshots


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # digest, set once the block is full and computed
    token_ids: tuple[int, ...] | None = None
    parent: bytes | None = None  # the previous block's digest (None for a first block)
    group: int = 0  # the layer group whose K/V the block holds while cached


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks of ``block_size`` slots hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def block_digest(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 over the parent block's digest and this block's token ids (as int64 bytes)."""
    return hashlib.sha256((parent or b"") + np.asarray(token_ids, np.int64).tobytes()).digest()


class BlockManager:
    """Allocates, shares and frees KV blocks; see the module docstring. ``windows`` has one
    entry per layer group: its sliding window in tokens, or None for full attention;
    ``snapshots`` (a hybrid model's) the state snapshots a prefix hit resumes from."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 windows: tuple[int | None, ...] = (None,), snapshots: StateSnapshots | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = windows
        self.snapshots = snapshots
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._cached: dict[tuple[int, bytes], int] = {}  # (group, block digest) -> block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def evictable_blocks(self) -> list[int]:
        """Cached blocks no sequence holds, least recently used first: the order an allocation
        takes them in once the free blocks run out."""
        return list(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the prefix cache can hand out (held by sequences or not)."""
        return len(self._cached)

    def blocks_needed(self, num_tokens: int, chunk: int) -> int:
        """The most blocks one sequence of ``num_tokens`` tokens ever holds, computed in chunks of
        up to ``chunk`` tokens: a sliding group holds its window plus the chunk being written."""
        total = 0
        for window in self.windows:
            span = num_tokens if window is None else min(num_tokens, window + chunk)
            total += min(blocks_for(num_tokens, self.block_size), blocks_for(span, self.block_size) + 1)
        return total

    def share_cached_prefix(self, seq: Sequence) -> int | None:
        """Give a newly admitted ``seq`` the cached blocks of its longest cached prefix; with
        state snapshots, the longest that has one, whose slot is returned (the state to copy into
        ``seq``'s own before it runs). None: no snapshot to resume from.

        At least one token is always left to compute (the step must produce logits), so a
        cached block is never written again.
        """
        assert not any(seq.block_tables) and seq.num_computed_tokens == 0
        seq.block_tables = [[] for _ in self.windows]  # one per group
        if not self.enable_prefix_caching:
            return None
        self._hash_full_blocks(seq)
        max_hits = min((seq.num_tokens - 1) // self.block_size, len(seq.block_hashes))
        hits = [[self._lookup(seq, g, i) for i in range(max_hits)] for g in range(len(self.windows))]
        for k in range(max_hits, 0, -1):  # the longest prefix every group can serve
            if all(None not in hits[g][self._first_read(g, k * self.block_size) : k]
                   for g in range(len(self.windows))) and self._resumable(seq, k):
                break
        else:
            k = 0
        for g, table in enumerate(seq.block_tables):
            first = self._first_read(g, k * self.block_size)
            table += [NO_BLOCK] * first
            for block_id in hits[g][first:k]:
                self._acquire(block_id)
                table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = k * self.block_size
        if self.snapshots is None or k == 0:
            return None
        return self.snapshots.resume(seq.block_hashes[k - 1])

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow every group's block table to hold ``num_tokens`` tokens; all or nothing. First,
        sliding groups give back the blocks that no query from ``seq.num_computed_tokens`` on
        reads any more."""
        if len(seq.block_tables) != len(self.windows):  # never admitted through the cache
            assert not any(seq.block_tables)
            seq.block_tables = [[] for _ in self.windows]
        self._release_passed_blocks(seq)
        size = blocks_for(num_tokens, self.block_size)
        needed = sum(max(0, size - len(table)) for table in seq.block_tables)
        if needed > self.num_free_blocks:
            return False
        for table in seq.block_tables:
            while len(table) < size:
                table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Its tail goes first, so the tail is evicted before the
        shared head of a prefix."""
        for table in seq.block_tables:
            for block_id in reversed(table):
                if block_id != NO_BLOCK:
                    self._release(block_id)
        seq.block_tables = [[] for _ in self.windows]
        if self.snapshots is not None:
            self.snapshots.forget(seq)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every full, computed block of ``seq`` whose token ids are all known (no
        placeholder of a token still on its way to the host) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        self._hash_full_blocks(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for g, table in enumerate(seq.block_tables):
            for i in range(num_full):
                block = self.blocks[table[i]] if table[i] != NO_BLOCK else None
                if block is None or block.hash is not None:
                    continue  # given back, registered earlier, or shared from the cache
                block.hash, block.group = seq.block_hashes[i], g
                block.token_ids = self._tokens_of_block(seq, i)
                block.parent = seq.block_hashes[i - 1] if i else None
                # If another sequence computed the same prefix first, its block stays the cached one.
                self._cached.setdefault((g, block.hash), block.block_id)
        if self.snapshots is not None:
            self.snapshots.file(seq, lambda digest: (0, digest) in self._cached)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence uses (vLLM's ``reset_prefix_cache``): they
        become free, so later prompts are computed from scratch (benchmarks, tests)."""
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._uncache(block_id)
            self._free.append(block_id)

    def check_invariants(self) -> None:
        """Every block is in exactly one state and the cache index agrees with the blocks."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & evictable, "a block is both free and evictable"
        for block in self.blocks:
            in_use = block.ref_count > 0
            assert block.ref_count >= 0
            assert in_use + (block.block_id in free) + (block.block_id in evictable) == 1, block
            if block.block_id in free:
                assert block.hash is None
        for (group, block_hash), block_id in self._cached.items():
            assert (self.blocks[block_id].group, self.blocks[block_id].hash) == (group, block_hash)
        for block_id in evictable:
            block = self.blocks[block_id]
            assert self._cached.get((block.group, block.hash)) == block_id
        if self.snapshots is not None:
            self.snapshots.check_invariants({digest for group, digest in self._cached if group == 0})

    def _resumable(self, seq: Sequence, num_blocks: int) -> bool:
        """Whether a hit of ``num_blocks`` blocks resumes every layer: always, but for a hybrid
        model's linear layers, which need a snapshot of their state where it ends."""
        return self.snapshots is None or self.snapshots.has(seq.block_hashes[num_blocks - 1])

    def _first_read(self, group: int, position: int) -> int:
        """The first block a query at ``position`` (or any later one) reads in ``group``."""
        window = self.windows[group]
        return 0 if window is None else max(0, position - window + 1) // self.block_size

    def _release_passed_blocks(self, seq: Sequence) -> None:
        for g, table in enumerate(seq.block_tables):
            for i in range(min(self._first_read(g, seq.num_computed_tokens), len(table))):
                if table[i] != NO_BLOCK:
                    self._release(table[i])
                    table[i] = NO_BLOCK

    def _hash_full_blocks(self, seq: Sequence) -> None:
        """Extend ``seq.block_hashes`` over every full block whose tokens are all known."""
        while (len(seq.block_hashes) + 1) * self.block_size <= seq.num_tokens:
            index = len(seq.block_hashes)
            if seq.has_pending(index * self.block_size, (index + 1) * self.block_size):
                return  # a later call, once the token is known, hashes it and what follows
            tokens = self._tokens_of_block(seq, index)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_digest(parent, tokens))

    def _lookup(self, seq: Sequence, group: int, index: int) -> int | None:
        """The cached block of ``group`` holding ``seq``'s block ``index``, verified (a digest
        collision with another prefix is a miss)."""
        block_id = self._cached.get((group, seq.block_hashes[index]))
        if block_id is None:
            return None
        block, parent = self.blocks[block_id], seq.block_hashes[index - 1] if index else None
        if block.token_ids != self._tokens_of_block(seq, index) or block.parent != parent:
            return None
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"double free of block {block_id}"
        if block.ref_count == 0:
            if block.hash is not None and self._cached.get((block.group, block.hash)) == block_id:
                self._evictable[block_id] = None
            else:
                block.hash = block.token_ids = block.parent = None
                self._free.append(block_id)

    def _take_free_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:  # recycle the least recently used cached block
            block_id, _ = self._evictable.popitem(last=False)
            self._uncache(block_id)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _uncache(self, block_id: int) -> None:
        block = self.blocks[block_id]
        del self._cached[(block.group, block.hash)]
        if self.snapshots is not None and block.group == 0:
            self.snapshots.drop(block.hash)  # no hit can end on this block any more
        block.hash = block.token_ids = block.parent = None

    def _acquire(self, block_id: int) -> None:
        self._evictable.pop(block_id, None)
        self.blocks[block_id].ref_count += 1

    def _tokens_of_block(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
