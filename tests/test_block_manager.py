"""Block manager: allocation, refcounts, prefix-cache hits and LRU eviction, with exact counts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pico_vllm.engine import block_manager
from pico_vllm.engine.block_manager import BlockManager, block_digest
from pico_vllm.engine.sequence import NO_BLOCK, Sequence
from pico_vllm.sampling_params import SamplingParams

BS = 4


def seq(tokens: list[int], name: str = "r") -> Sequence:
    return Sequence(name, tokens, SamplingParams(max_tokens=4))


def computed(manager: BlockManager, s: Sequence) -> Sequence:
    """Admit ``s`` and pretend its whole prompt was computed."""
    manager.share_cached_prefix(s)
    assert manager.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    manager.cache_full_blocks(s)
    return s


def test_allocate_and_free_exact_counts():
    m = BlockManager(num_blocks=8, block_size=BS)
    s = seq(list(range(10)))
    assert m.allocate(s, 10)
    assert len(s.block_table) == 3 and m.num_free_blocks == 5
    assert m.allocate(s, 12) and len(s.block_table) == 3  # still fits in 3 blocks
    assert m.allocate(s, 13) and len(s.block_table) == 4
    m.check_invariants()
    m.free(s)
    assert s.block_table == [] and m.num_free_blocks == 8
    m.check_invariants()


def test_allocation_is_all_or_nothing():
    m = BlockManager(num_blocks=3, block_size=BS)
    s = seq(list(range(20)))
    assert not m.allocate(s, 20)
    assert s.block_table == [] and m.num_free_blocks == 3


def test_shared_prefix_hits_full_blocks_and_counts_refs():
    m = BlockManager(num_blocks=10, block_size=BS)
    a = computed(m, seq(list(range(10)), "a"))  # blocks: [0-3] [4-7] [8,9]
    b = seq(list(range(8)) + [99, 98, 97], "b")
    m.share_cached_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [m.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert m.allocate(b, b.num_tokens) and len(b.block_table) == 3
    assert m.num_free_blocks == 10 - 4
    m.check_invariants()


def test_hit_needs_the_same_prefix_not_just_the_same_block():
    m = BlockManager(num_blocks=10, block_size=BS)
    computed(m, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    b = seq([0, 0, 0, 0, 5, 6, 7, 8, 9], "b")  # second block equal, first differs
    m.share_cached_prefix(b)
    assert b.num_computed_tokens == 0 and b.block_table == []


def test_hit_leaves_at_least_one_token_to_compute():
    m = BlockManager(num_blocks=10, block_size=BS)
    computed(m, seq(list(range(8)), "a"))  # exactly two full blocks
    b = seq(list(range(8)), "b")
    m.share_cached_prefix(b)
    assert b.num_computed_tokens == 4  # the last block is recomputed, never rewritten in place
    assert len(b.block_table) == 1


def test_hash_collision_is_caught_by_token_check():
    m = BlockManager(num_blocks=10, block_size=BS)
    a = computed(m, seq([1, 2, 3, 4, 5], "a"))
    block = m.blocks[a.block_table[0]]
    # Pretend another prefix digests to the cached block's digest.
    b = seq([9, 9, 9, 9, 5], "b")
    m._cached[(0, block_digest(None, (9, 9, 9, 9)))] = block.block_id  # (group, digest)
    m.share_cached_prefix(b)
    assert b.num_computed_tokens == 0


def test_a_digest_collision_across_prefixes_never_serves_another_prefix(monkeypatch):
    """The old scheme identified a block by hash((parent, tokens)) and compared only its own
    tokens: two prefixes ending in the same block whose chained hashes collided shared K/V. Force
    exactly that collision (a digest that ignores the parent) and check the hit is refused."""
    monkeypatch.setattr(block_manager, "block_digest",
                        lambda parent, tokens: hashlib.sha256(bytes(str(tokens), "ascii")).digest())
    m = BlockManager(num_blocks=10, block_size=BS)
    x, y, t = [1, 1, 1, 1], [2, 2, 2, 2], [7, 7, 7, 7]
    computed(m, seq(x + t + [0], "a"))  # caches [x] and [t] after x
    computed(m, seq(y + [5, 5, 5, 5] + [0], "c"))  # caches [y]
    victim = seq(y + t + [0], "b")  # [y] is a true hit; [t] collides with [t]-after-x
    m.share_cached_prefix(victim)
    assert victim.num_cached_tokens == BS  # only [y]: the colliding block is refused


def test_block_digests_are_sha256_of_parent_and_tokens():
    first = block_digest(None, (1, 2, 3, 4))
    assert first == hashlib.sha256(np.asarray([1, 2, 3, 4], np.int64).tobytes()).digest()
    assert block_digest(first, (5, 6, 7, 8)) != block_digest(None, (5, 6, 7, 8))


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    m = BlockManager(num_blocks=4, block_size=BS)
    a = computed(m, seq(list(range(9)), "a"))  # 2 full cached blocks + 1 partial
    m.free(a)
    assert m.num_free_blocks == 4  # cached blocks count as free (reclaimable)
    m.check_invariants()
    again = seq(list(range(9)), "a2")
    m.share_cached_prefix(again)
    assert again.num_cached_tokens == 8  # came back from the cache
    m.free(again)
    # A new unrelated sequence needing all 4 blocks takes the never-cached one first, then
    # evicts cached ones in LRU order: the tail block (freed first) before the head.
    big = seq(list(range(100, 116)), "big")
    assert m.allocate(big, 16)
    assert m._cached == {}
    assert m.num_free_blocks == 0
    m.check_invariants()


def test_partial_eviction_keeps_the_head_of_a_prefix():
    m = BlockManager(num_blocks=4, block_size=BS)
    a = computed(m, seq(list(range(13)), "a"))  # 3 full cached blocks + 1 partial
    head = a.block_table[0]
    m.free(a)
    other = seq([500, 501, 502], "o")
    assert m.allocate(other, 3) and m.allocate(other, 8)  # takes the partial block, then 1 LRU
    c = seq(list(range(13)), "c")
    m.share_cached_prefix(c)
    assert c.block_table[:1] == [head]  # the head survived: the tail was evicted first


def test_disabled_prefix_caching_never_hits():
    m = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = computed(m, seq(list(range(9)), "a"))
    m.free(a)
    b = seq(list(range(9)), "b")
    m.share_cached_prefix(b)
    assert b.num_computed_tokens == 0 and m._cached == {}


def test_double_free_is_detected():
    m = BlockManager(num_blocks=4, block_size=BS)
    s = seq([1, 2, 3])
    assert m.allocate(s, 3)
    table = list(s.block_table)
    m.free(s)
    s.block_tables = [table]
    with pytest.raises(AssertionError, match="double free"):
        m.free(s)


def test_reset_prefix_cache_forgets_unused_blocks_and_keeps_used_ones():
    m = BlockManager(num_blocks=6, block_size=BS)
    done = computed(m, seq(list(range(8)), "done"))  # 2 cached blocks
    m.free(done)
    live = computed(m, seq(list(range(50, 58)), "live"))  # 2 cached blocks, still in use
    m.reset_prefix_cache()
    m.check_invariants()
    assert m.num_free_blocks == 4
    again = seq(list(range(9)), "again")
    m.share_cached_prefix(again)
    assert again.num_cached_tokens == 0  # the finished prompt's blocks were forgotten
    twin = seq(list(range(50, 59)), "twin")
    m.share_cached_prefix(twin)
    assert twin.num_cached_tokens == 8 and twin.block_table == live.block_table


# Layer groups: a sliding-window group beside a full-attention one (vLLM's hybrid KV manager).
WINDOW = 8  # tokens: two blocks of 4


def grow(manager: BlockManager, s: Sequence, to: int, chunk: int = 1) -> None:
    """Compute ``s`` up to ``to`` tokens, ``chunk`` at a time, as the scheduler would."""
    while s.num_computed_tokens < to:
        n = min(chunk, to - s.num_computed_tokens)
        assert manager.allocate(s, s.num_computed_tokens + n)
        s.num_computed_tokens += n
        manager.cache_full_blocks(s)


def live(table: list[int]) -> list[int]:
    return [b for b in table if b != NO_BLOCK]


def test_a_sliding_group_gives_back_blocks_its_window_has_passed():
    m = BlockManager(num_blocks=40, block_size=BS, enable_prefix_caching=False, windows=(WINDOW, None))
    s = seq(list(range(41)))
    grow(m, s, 40)
    sliding, full = s.block_tables
    # The next query (position 40) reads keys 33..40: blocks 8 (32-35), 9 and 10 from here on.
    assert sliding[:8] == [NO_BLOCK] * 8 and len(live(sliding)) == 2 and len(full) == 10
    assert m.num_free_blocks == 40 - 12
    assert m.allocate(s, 41)  # block 10 for position 40; block 8 still holds keys 33..35
    assert len(live(s.block_tables[0])) == 3 and m.num_free_blocks == 40 - 14
    s.num_computed_tokens = 41
    assert m.allocate(s, 41) and len(live(s.block_tables[0])) == 3  # 34..41: blocks 8 to 10 still
    m.check_invariants()
    m.free(s)
    assert m.num_free_blocks == 40
    m.check_invariants()


def test_admission_counts_every_group_all_or_nothing():
    m = BlockManager(num_blocks=5, block_size=BS, windows=(WINDOW, None))
    s = seq(list(range(12)))
    assert not m.allocate(s, 12)  # 3 blocks for each group: 6 > 5
    assert s.block_tables == [[], []] and m.num_free_blocks == 5
    assert m.blocks_needed(12, chunk=12) == 6
    # Long sequences: a sliding group holds its window plus a chunk, the full group everything.
    assert m.blocks_needed(400, chunk=16) == -(-(WINDOW + 16) // BS) + 1 + 100


def test_a_prefix_hit_needs_each_group_to_hold_what_its_layers_read():
    m = BlockManager(num_blocks=40, block_size=BS, windows=(WINDOW, None))
    a = seq(list(range(24)), "a")
    m.share_cached_prefix(a)
    grow(m, a, 24, chunk=24)
    # Blocks 0..5 computed in one chunk: every group's full blocks cached; the sliding ones are
    # given back on the next allocation, and stay in the cache (evictable) until reused.
    assert m.allocate(a, 25)
    assert a.block_tables[0][:4] == [NO_BLOCK] * 4
    m.free(a)
    b = seq(list(range(22)) + [99, 98, 97], "b")
    m.share_cached_prefix(b)
    # 5 full blocks match (20 tokens); the query at 20 reads keys 13..: sliding blocks 3 and 4.
    assert b.num_cached_tokens == 20
    assert b.block_tables[0][:3] == [NO_BLOCK] * 3 and len(live(b.block_tables[0])) == 2
    assert len(b.block_tables[1]) == 5
    m.check_invariants()
    m.free(b)
    # Another sequence takes every free block, then the least recently used cached one: the
    # sliding group's block 4. A prefix of 5 blocks is no longer served whole; of 4 it is
    # (sliding blocks 2 and 3 hold keys 9..15 for the query at 16).
    m._evictable.move_to_end(m._cached[(0, b.block_hashes[4])], last=False)
    for _ in range(len(m._free) + 1):
        m._take_free_block()
    c = seq(list(range(22)) + [99, 98, 97], "c")
    m.share_cached_prefix(c)
    assert c.num_cached_tokens == 16 and live(c.block_tables[0]) == [
        m._cached[(0, c.block_hashes[2])], m._cached[(0, c.block_hashes[3])]]


def test_gemma3_shaped_kv_memory_at_8k_context():
    """Gemma 3 4B's shape: 34 layers, 5 local (window 1024) to 1 global, 4 KV heads of 256, bf16.
    One 8,192-token sequence, prefilled in chunks of 2,048 and then decoded: the hybrid layout
    holds about a quarter of what full attention holds."""
    import mlx.core as mx

    from pico_vllm.layers.kv_cache import KVSpec

    windows = tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(34))
    spec = KVSpec(34, 4, 256, 8, windows)
    layout = spec.layout
    assert layout.slots == 5 and layout.windows == (1024,) * 6 + (None,)  # 29 local: 6 groups of <= 5
    m = BlockManager(20_000, block_size=16, enable_prefix_caching=False, windows=layout.windows)
    s = seq(list(range(8192)))
    grow(m, s, 8192 - 1, chunk=2048)
    grow(m, s, 8192)
    used = m.num_blocks - m.num_free_blocks
    # The global group: every block; each local group: the 64 blocks of the last 1,024 tokens
    # (65 when the window does not start on a block boundary).
    assert used == 512 + 6 * 64
    hybrid = used * spec.bytes_per_block(16, mx.bfloat16) / 8192
    full = KVSpec(34, 4, 256, 8).bytes_per_block(16, mx.bfloat16) / 16
    assert full == 34 * 2 * 4 * 256 * 2  # 139,264 bytes per token
    print(f"KV bytes per token at 8k: full attention {full:,.0f}, hybrid {hybrid:,.0f} "
          f"({full / hybrid:.2f}x less)")
    assert 3.8 < full / hybrid < 3.9
