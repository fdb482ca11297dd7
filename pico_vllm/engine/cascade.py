"""Which decode rows of a step share a prefix of blocks, for cascade attention
(:func:`metal_kernels.cascade_attention`).

Rows share a block when their tables hold the same block id at the same index: the prefix cache
maps equal prompt prefixes to the same blocks, ``n`` choices of a prompt start from its blocks,
and the positions of a chunk verifying drafts are rows of one sequence, reading its blocks. The
planner groups the rows by their first block. A group becomes one *set* over the whole blocks
all its rows have in common (requests behind one system prompt), or, where that saves more
reading, one set per sequence in it (each verifying sequence's positions over its own blocks).
A shared block always lies wholly before each member's query token, which every row reads from
its own table. Several sets are one shared-part pass per layer, each set's blocks gathered once.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from pico_vllm.engine.decode_graphs import DecodeGraphs
from pico_vllm.layers.attention import SharedPrefix

# A set is worth its place in the shared-part pass when it shares this many blocks and saves
# reading this many ((members - 1) * shared blocks): the smallest set that paid on the CPU,
# SmolLM2 shapes, was 4 rows sharing 4 blocks (see the README's cascade section).
MIN_SHARED_BLOCKS = 4
MIN_SAVED_BLOCKS = 12


class SharedSet(NamedTuple):
    rows: list[int]  # the decode rows in the set
    num_blocks: int  # whole blocks they share from the start of their tables

    @property
    def saved_blocks(self) -> int:
        """Block reads the set saves: all but one member's."""
        return (len(self.rows) - 1) * self.num_blocks


def plan_shared_prefix(
    tables: list[np.ndarray], context_lens: list[int], owners: list[int], block_size: int,
    min_blocks: int = MIN_SHARED_BLOCKS, min_saved: int = MIN_SAVED_BLOCKS,
) -> list[SharedSet]:
    """The cascade's sets for decode rows with block tables ``tables[b]`` (one layer group's, at
    least ``ceil(context_lens[b] / block_size)`` long) owned by sequences ``owners[b]``: each
    set shares at least ``min_blocks`` blocks and saves at least ``min_saved`` block reads;
    empty when none does."""
    whole = [(length - 1) // block_size for length in context_lens]  # blocks before the query's

    def common(rows: list[int]) -> SharedSet:
        limit = min(whole[b] for b in rows)
        heads = np.stack([tables[b][:limit] for b in rows])
        equal = (heads == heads[0]).all(axis=0)
        return SharedSet(rows, limit if equal.all() else int(np.argmin(equal)))

    def worth(option: list[SharedSet]) -> list[SharedSet]:
        # The sets that pay their place, before the options are compared: a grouping whose
        # larger saving lies in sets too small to keep must not hide one whose sets are kept.
        return [s for s in option if s.num_blocks >= min_blocks and s.saved_blocks >= min_saved]

    by_first: dict[int, list[int]] = {}
    for b, (table, n) in enumerate(zip(tables, whole)):
        if n >= min_blocks:
            by_first.setdefault(int(table[0]), []).append(b)
    sets = []
    for rows in by_first.values():
        by_owner: dict[int, list[int]] = {}
        for b in rows:
            by_owner.setdefault(owners[b], []).append(b)
        together = worth([common(rows)])
        apart = worth([common(members) for members in by_owner.values() if len(members) > 1])
        sets += max(together, apart, key=lambda option: sum(s.saved_blocks for s in option))
    return sets


def shared_prefix_arrays(
    plan: list[SharedSet], tables: list[np.ndarray], lengths: list[int], rows: int, block_size: int,
    scratch: int, graphs: DecodeGraphs | None = None,
) -> SharedPrefix:
    """The ``SharedPrefix`` arrays of ``plan`` for decode rows with tables ``tables[b]``
    (``[G, n]``) and ``lengths``, padded to ``rows`` with the ``scratch`` block; for a captured
    graph, every dimension is rounded up to one of the ``graphs``' buckets."""
    groups = tables[0].shape[0]
    skip = [0] * len(tables)  # blocks a row reads through its set
    for shared in plan:
        for b in shared.rows:
            skip[b] = shared.num_blocks
    # The own tables are as wide as the longest one past its shared blocks, not as the whole
    # tables: that is the reading cascade saves.
    width = max(t.shape[1] - s for t, s in zip(tables, skip))
    num_sets, members = len(plan), max(len(s.rows) for s in plan)
    shared_width = max(s.num_blocks for s in plan)
    if graphs is not None:
        num_sets, members = graphs.rows_bucket(num_sets), graphs.rows_bucket(members)
        shared_width, width = graphs.width_bucket(shared_width), graphs.width_bucket(width)
    set_tables = np.full((groups, num_sets, shared_width), scratch, np.int32)
    set_rows, set_lens = np.zeros((num_sets, members), np.int32), np.zeros((num_sets, members), np.int32)
    row_slots = np.full(rows, num_sets * members, np.int32)  # past the last slot: in no set
    for s, shared in enumerate(plan):
        set_tables[:, s, : shared.num_blocks] = tables[shared.rows[0]][:, : shared.num_blocks]
        for r, b in enumerate(shared.rows):
            set_rows[s, r], set_lens[s, r], row_slots[b] = b, shared.num_blocks * block_size, s * members + r
    suffix_lens = np.zeros(rows, np.int32)
    suffix_tables = np.full((groups, rows, width), scratch, np.int32)
    for b, own in enumerate(tables):
        suffix_tables[:, b, : own.shape[1] - skip[b]] = own[:, skip[b] :]
        suffix_lens[b] = lengths[b] - skip[b] * block_size
    arrays = (set_tables, set_rows, set_lens, row_slots, suffix_tables, suffix_lens)
    return SharedPrefix(*(mx.array(a) for a in arrays))
