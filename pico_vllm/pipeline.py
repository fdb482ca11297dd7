"""Pipeline parallelism over ``mx.distributed``: one model across the ranks of ``mlx.launch``, by layers.

Each rank (a *stage*) holds a contiguous slice of the layers and the KV pool of those layers
only; the first also holds the embeddings, the last the final norm and the LM head. A step's
hidden states flow down the stages with ``send`` / ``recv``; the last stage samples, and its
samples (ids, logprobs, whether a row's logits broke) reach every rank in one ``all_sum``:

```
 rank 0: embed, layers 0-3  --h-->  rank 1: layers 4-6, norm, LM head, sample
     ^                                                              |
     +------------- samples (ids, logprobs), to every rank ---------+
```

As with tensor parallelism no scheduling state is exchanged: every rank runs the same scheduler
over the same requests, so block tables agree without messages; the pool size is the smallest
any rank can hold.

**Micro-batches** keep the stages busy at once where a step carries prompt chunks: its
tokens are split into as many parts as there are stages (between sequences, or inside a long
chunk), and each part goes down the pipeline on its own, so stage 1 computes part 1 while
stage 0 computes part 2 (MLX evaluates a rank's graph in order: part 1's send goes out before
part 2's layers run). With ``S`` stages and ``S`` parts a step keeps each stage idle for
``(S - 1) / (2S - 1)`` of it at best (a third for two stages), against ``(S - 1) / S`` without
parts. That pays where compute is the cost (prefill); a decode step's cost is reading the
weights, once per part, so decode steps go whole.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

Logprobs = tuple[mx.array, mx.array, mx.array]  # each row's logprob, top ids, top values


def parameter_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters (what a forward through it reads)."""
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


def split_layers(layer_costs: Sequence[float], head_cost: float, size: int) -> list[range]:
    """Contiguous slices of the layers, one per stage, each of at least one layer, that make the
    costliest stage as cheap as it can be; the last stage also pays ``head_cost`` (the LM head).
    Costs are parameter bytes: a decode step reads each layer's weights once."""
    n = len(layer_costs)
    if size > n:
        raise ValueError(f"pipeline_parallel_size {size} is more than the model's {n} layers "
                         "(each stage needs at least one)")
    prefix = [0.0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)

    def cost(start: int, end: int, last: bool) -> float:
        return prefix[end] - prefix[start] + (head_cost if last else 0.0)

    # best[s][i]: (the costliest stage, the sum of squared stage costs) of layers [i, n) split
    # over stages s..size-1, smallest first: between equally costly splits, the most even, and
    # between equally even ones, the one with earlier stages longer (the last one samples).
    worst = (float("inf"), float("inf"))
    best = [[worst] * (n + 1) for _ in range(size + 1)]
    cut = [[n] * (n + 1) for _ in range(size + 1)]
    best[size][n] = (0.0, 0.0)
    for s in range(size - 1, -1, -1):
        for i in range(n - (size - s) + 1):
            last = s == size - 1
            for end in [n] if last else range(i + 1, n - (size - s - 1) + 1):
                here, rest = cost(i, end, last), best[s + 1][end]
                value = (max(here, rest[0]), here * here + rest[1])
                if value <= best[s][i]:
                    best[s][i], cut[s][i] = value, end
    slices, start = [], 0
    for s in range(size):
        slices.append(range(start, cut[s][start]))
        start = cut[s][start]
    return slices


Piece = tuple[int, int, int]  # a sequence's index in the step, the first of its chunk's tokens, how many
MIN_PIECE = 2  # tokens in each piece of a cut chunk: a one-token piece would look like a decode


def micro_batches(num_tokens: Sequence[int], parts: int) -> list[list[Piece]]:
    """A step's sequences (``num_tokens`` each, decodes first) in at most ``parts`` parts of
    about equal tokens, each a list of pieces: a long prompt chunk may be cut between two parts
    (its second piece attends over the first's K/V, which the same stage wrote just before), so
    one long prompt fills the pipeline too. A step of decodes only (one token each) stays whole:
    its cost is reading each stage's weights, which every part would read again (measured: 2
    parts made a 2-stage decode step 2.3x slower at batch 8, 1.6x at batch 32)."""
    whole = [[(i, 0, n) for i, n in enumerate(num_tokens)]]
    if parts < 2 or all(n == 1 for n in num_tokens):
        return whole
    starts = [0]
    for n in num_tokens:
        starts.append(starts[-1] + n)
    total, cuts = starts[-1], set()
    for k in range(1, parts):
        cut = total * k // parts
        i = bisect.bisect_right(starts, cut) - 1  # the sequence whose chunk holds token ``cut``
        inner = cut - starts[i]
        if inner and not MIN_PIECE <= inner <= num_tokens[i] - MIN_PIECE:  # to its nearer end
            inner = 0 if 2 * inner < num_tokens[i] else num_tokens[i]
        cuts.add(starts[i] + inner)
    bounds = [0, *sorted(c for c in cuts if 0 < c < total), total]
    return [[(i, max(a, start) - start, min(b, start + n) - max(a, start))
             for i, (start, n) in enumerate(zip(starts, num_tokens)) if max(a, start) < min(b, start + n)]
            for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class PipelineStage:
    """This rank's place in the pipeline: the layers it holds (global indices) of its group."""

    group: mx.distributed.Group
    layers: range

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.group.size() - 1

    def receive(self, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
        """The hidden states the previous stage sends for this part of the step."""
        return mx.distributed.recv(shape, dtype, self.rank - 1, group=self.group)

    def send(self, hidden: mx.array) -> mx.array:
        """Hand ``hidden`` to the next stage; evaluating the result sends it."""
        return mx.distributed.send(hidden, self.rank + 1, group=self.group)

    def share_samples(self, token_ids: mx.array | None, broken: mx.array | None,
                      logprobs: Logprobs | None, rows: int, num_top: int | None,
                      after: list[mx.array]) -> tuple[mx.array, mx.array, Logprobs | None]:
        """The last stage's ``token_ids[rows]``, ``broken[rows]`` and, where a row asked,
        ``(logprobs[rows], top_ids[rows, num_top], top_values[rows, num_top])`` on every rank
        (``num_top`` None: no row asked). The other ranks pass None and enter the ``all_sum``
        only ``after`` their sends (else a stage could wait on the samples before sending what
        they are computed from)."""
        width = 2 + (num_top or 0)
        if self.is_last:
            ints = [token_ids.astype(mx.int32)[:, None], broken.astype(mx.int32)[:, None]]
            floats = None
            if num_top is not None:
                chosen, top_ids, top_values = logprobs
                ints.append(top_ids.astype(mx.int32))
                floats = mx.concatenate([chosen[:, None], top_values], axis=1)
            ints = mx.concatenate(ints, axis=1)
        else:
            ints = mx.zeros((rows, width), mx.int32)
            ints = mx.depends(ints, after) if after else ints
            floats = None if num_top is None else mx.zeros((rows, 1 + num_top), mx.float32)
        ints = mx.distributed.all_sum(ints, group=self.group)
        shared = None
        if num_top is not None:  # after the first: every rank runs the two collectives in one order
            floats = mx.distributed.all_sum(mx.depends(floats, ints), group=self.group)
            shared = (floats[:, 0], ints[:, 2:], floats[:, 1:])
        return ints[:, 0], ints[:, 1].astype(mx.bool_), shared
