"""Decode steps captured with ``mx.compile``: MLX's stand-in for vLLM's CUDA graphs.

A decode-shaped step (one query token per row: a sequence's next token, or one position of a
chunk verifying drafts) has the same structure every time; only its shapes change. So the
runner pads it to a *bucket* — rows rounded up to 1, 2, 3, 4, 6, 8, 12, 16, ... (up to
``max_rows``: ``max_num_seqs`` times the rows a sequence may verify), block-table width to as
many blocks, and so are the dimensions of cascade attention's sets: powers of two and
1.5x between them, so padding wastes at most a third of a step (a padding row costs a whole
row's matrix products and, in the CPU reference, its attention; powers of two alone measured
up to 25% slower steps, 23 rows run as 32) while the buckets stay two per doubling — and runs
the one graph ``mx.compile`` traced for that bucket. Tracing happens once per bucket;
afterwards a step skips Python graph building and runs MLX's simplified, fused graph. A step
with more rows than the largest bucket (drafts from a client's prediction on an engine without
speculation) runs eagerly.

- **State.** The KV pool (``KVCache.state``, one list that lives as long as the pool) is the
  graph's ``inputs`` and ``outputs``: MLX reads the current arrays before each call and puts the
  written ones back after it, and the in-place scatter keeps a step O(tokens written).
- **Padding rows are harmless.** They write their K/V to the pool's scratch block, which no
  sequence ever owns, attend over a context of length 0 (zeros out), and their logits are dropped.
- **Only ids come back** for all-greedy batches: the argmax is part of the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

DecodeStep = Callable[..., tuple[mx.array, mx.array]]


def buckets(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... below ``limit``, then ``limit`` itself (a step's batch and
    block-table width are padded up to one of these)."""
    sizes, power = [1, 2, 3], 4
    while power < limit:
        sizes += [power, power * 3 // 2]
        power *= 2
    return [size for size in sizes if size < limit] + [limit]


def round_up(n: int, sizes: list[int]) -> int:
    """The smallest of the bucket ``sizes`` that holds ``n``."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


class DecodeGraphs:
    """One compiled decode step per bucket (rows, block-table width and, with cascade attention,
    its sets' dimensions), traced on first use.

    ``step(input_ids, positions, slot_blocks, slot_offsets, block_tables, context_lens, ...)``
    returns ``(logits[B, V], argmax[B])``; it must only read and write the pool through ``state``.
    """

    def __init__(self, step: DecodeStep, state: list[mx.array], max_rows: int, max_blocks: int):
        self.batch_buckets = buckets(max_rows)
        self.width_buckets = buckets(max_blocks)
        self.captures = 0  # graphs traced so far: one per bucket used

        def traced(*arrays: mx.array) -> tuple[mx.array, mx.array]:
            self.captures += 1  # this Python body runs only while MLX traces a new bucket
            return step(*arrays)

        self._compiled = mx.compile(traced, inputs=state, outputs=state)

    def bucket(self, batch: int, width: int) -> tuple[int, int] | None:
        """The padded (batch, block-table width) a step of this size runs at; None when it has
        more rows than any graph (it runs eagerly)."""
        if batch > self.batch_buckets[-1]:
            return None
        return self.rows_bucket(batch), self.width_bucket(width)

    def rows_bucket(self, n: int) -> int:
        return round_up(n, self.batch_buckets)

    def width_bucket(self, n: int) -> int:
        return round_up(n, self.width_buckets)

    def all_buckets(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.batch_buckets for w in self.width_buckets]

    def __call__(self, *arrays: mx.array) -> tuple[mx.array, mx.array]:
        """Run the graph for these (already padded) arrays."""
        return self._compiled(*arrays)
