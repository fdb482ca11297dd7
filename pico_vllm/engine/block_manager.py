"""The KV pool's bookkeeping: which block belongs to whom, and which hold a reusable prefix.

The pool has ``num_blocks`` blocks of ``block_size`` token slots. A block is in exactly one of:

- **in use**: ``ref_count > 0`` — listed in the block table of that many sequences;
- **free**: never held a full, cached block (or its cache entry was evicted);
- **evictable**: unused, but it still holds a full block registered in the prefix cache, so a
  later request with the same prefix can take it back without recomputing. When no free block
  is left, the least recently used evictable block is recycled.

Prefix caching identifies a full block by a SHA-256 digest of its parent block's digest and its
own token ids: chaining makes equal digests mean equal *prefixes*, not just equal blocks. Tenants
share this cache, so a hit must be exact whatever the digest: a hit is verified against the
block's stored token ids *and* its parent's digest, so by induction over the chain the whole
prefix is equal (a collision can cost a miss, never serve another prefix's K/V — the hole vLLM
closed after CVE-2025-25183, where Python's ``hash`` identified blocks).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from pico_vllm.engine.sequence import PLACEHOLDER, Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # digest, set once the block is full and computed
    token_ids: tuple[int, ...] | None = None
    parent: bytes | None = None  # the previous block's digest (None for a first block)


def block_digest(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 over the parent block's digest and this block's token ids (as int64 bytes)."""
    return hashlib.sha256((parent or b"") + np.asarray(token_ids, np.int64).tobytes()).digest()


class BlockManager:
    """Allocates, shares and frees KV blocks; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._cached: dict[bytes, int] = {}  # block digest -> block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    def share_cached_prefix(self, seq: Sequence) -> None:
        """Give a newly admitted ``seq`` the cached blocks of its longest cached prefix.

        At least one token is always left to compute (the step must produce logits), so a
        cached block is never written again.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        max_hits = (seq.num_tokens - 1) // self.block_size
        parent = None
        for i in range(max_hits):
            tokens = self._tokens_of_block(seq, i)
            block_id = self._cached.get(block_digest(parent, tokens))
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent != parent:
                break  # a digest collision: this block holds another prefix
            self._acquire(block_id)
            seq.block_table.append(block_id)
            parent = self.blocks[block_id].hash
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq.block_table`` to hold ``num_tokens`` tokens; all or nothing."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Its tail goes first, so the tail is evicted before the
        shared head of a prefix."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of block {block_id}"
            if block.ref_count == 0:
                if block.hash is not None and self._cached.get(block.hash) == block_id:
                    self._evictable[block_id] = None
                else:
                    block.hash = block.token_ids = block.parent = None
                    self._free.append(block_id)
        seq.block_table = []

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every full, computed block of ``seq`` whose token ids are all known (no
        placeholder of a token still on its way to the host) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue  # registered earlier (or shared from the cache)
            tokens = self._tokens_of_block(seq, i)
            if PLACEHOLDER in tokens:
                return  # a later call, once the token is known, registers it and what follows
            parent = self.blocks[seq.block_table[i - 1]].hash if i else None
            block.token_ids, block.parent = tokens, parent
            block.hash = block_digest(parent, tokens)
            # If another sequence computed the same prefix first, its block stays the cached one.
            self._cached.setdefault(block.hash, block.block_id)

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
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].hash == block_hash
        for block_id in evictable:
            assert self._cached.get(self.blocks[block_id].hash) == block_id

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
        del self._cached[block.hash]
        block.hash = block.token_ids = block.parent = None

    def _acquire(self, block_id: int) -> None:
        self._evictable.pop(block_id, None)
        self.blocks[block_id].ref_count += 1

    def _tokens_of_block(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
