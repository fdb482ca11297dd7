"""Which decode rows of a step share a prefix of blocks, for cascade attention
(:func:`metal_kernels.cascade_attention`).

Rows share a block when their tables hold the same block id at the same index: the prefix cache
maps equal prompt prefixes to the same blocks, and ``n`` choices of a prompt start from its
blocks. The planner takes the largest set of rows whose tables start with the same block, and
their longest common run of whole blocks that lies before every member's query token. One such
set per step: the common case (many requests behind one system prompt, or one prompt's ``n``
choices) has one, and a second set would need a second shared-part launch per layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from pico_vllm.layers.attention import SharedPrefix

# Below these, the separate shared-part pass costs more than the reads it saves (measured on the
# CPU, SmolLM2 shapes; see the README's cascade section).
MIN_SHARED_ROWS = 4
MIN_SHARED_BLOCKS = 4


class SharedPrefixPlan(NamedTuple):
    rows: list[int]  # the decode rows in the cascade
    num_blocks: int  # whole blocks they share from the start of their tables


def plan_shared_prefix(
    tables: list[np.ndarray], context_lens: list[int], block_size: int,
    min_rows: int = MIN_SHARED_ROWS, min_blocks: int = MIN_SHARED_BLOCKS,
) -> SharedPrefixPlan | None:
    """The cascade for decode rows with block tables ``tables[b]`` (one layer group's, at least
    ``ceil(context_lens[b] / block_size)`` long), or None when no ``min_rows`` rows share
    ``min_blocks`` blocks. A shared block always lies wholly before its rows' query token
    (``num_blocks * block_size <= context_len - 1``), which every row reads from its own table."""
    whole = [(length - 1) // block_size for length in context_lens]  # blocks before the query's
    firsts = Counter(table[0] for table, n in zip(tables, whole) if n >= min_blocks)
    if not firsts:
        return None
    first, count = firsts.most_common(1)[0]
    if count < min_rows:
        return None
    rows = [b for b, (table, n) in enumerate(zip(tables, whole)) if n >= min_blocks and table[0] == first]
    limit = min(whole[b] for b in rows)
    heads = np.stack([tables[b][:limit] for b in rows])
    equal = (heads == heads[0]).all(axis=0)
    num_blocks = limit if equal.all() else int(np.argmin(equal))
    return SharedPrefixPlan(rows, num_blocks) if num_blocks >= min_blocks else None


def shared_prefix_arrays(
    plan: SharedPrefixPlan, tables: list[np.ndarray], lengths: list[int], rows: int, block_size: int,
    scratch: int, bucket: Callable[[int], int] | None = None,
) -> SharedPrefix:
    """The ``SharedPrefix`` arrays of ``plan`` for decode rows with tables ``tables[b]``
    (``[G, n]``) and ``lengths``, padded to ``rows`` with the ``scratch`` block; under captured
    graphs, ``bucket`` rounds the two tables' widths up to a width bucket."""
    groups, shared, members = tables[0].shape[0], plan.num_blocks, set(plan.rows)
    # The own tables are as wide as the longest one past its shared blocks, not as the whole
    # tables: that is the reading cascade saves.
    width = max(t.shape[1] - shared * (row in members) for row, t in enumerate(tables))
    shared_width = shared
    if bucket is not None:
        shared_width, width = bucket(shared), bucket(width)
    table = np.full((groups, shared_width), scratch, np.int32)
    table[:, :shared] = tables[plan.rows[0]][:, :shared]
    shared_lens, suffix_lens = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    suffix_tables = np.full((groups, rows, width), scratch, np.int32)
    for row, own in enumerate(tables):
        skip = shared if row in members else 0
        suffix_tables[:, row, : own.shape[1] - skip] = own[:, skip:]
        shared_lens[row], suffix_lens[row] = skip * block_size, lengths[row] - skip * block_size
    return SharedPrefix(*(mx.array(a) for a in (table, shared_lens, suffix_tables, suffix_lens)))
