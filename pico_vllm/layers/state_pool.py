"""The state pool: the fixed-size recurrent state of a hybrid model's linear layers, per sequence.

A hybrid model (Qwen3-Next and Qwen3.5's gated delta nets, LFM2's short convolutions, the Mamba-2
layers of Falcon-H1, Nemotron-H and Granite 4) keeps K/V only in its few attention layers; every
other layer carries a state whose size does not grow with the sequence: a convolution's last
``kernel - 1`` inputs, an SSM's or delta rule's ``[heads, d_v, d_k]`` matrix. The KV pool holds
the attention layers' blocks as usual; this pool holds the rest, one *slot* per running sequence:

```
                KV pool (attention layers)            state pool (linear layers)
 seq A   blocks [ 3 ][ 8 ][ 1 ]                slot 0: conv [K-1, C]  ssm [H, Dv, Dk]  (per layer)
 seq B   blocks [ 5 ][ 2 ]                     slot 1: ...
 cached prefixes (prefix caching)              snapshot slots: a state at a block boundary
 padding rows of a captured step               the last slot (scratch: never a sequence's)
```

A sequence takes a slot when the scheduler admits it and gives it back when it finishes, is
aborted or preempted (recompute: a preempted sequence starts again from position 0 with a fresh
state). Writes update the arrays in place, like the KV pool's, and the arrays live in the KV
pool's ``state`` list, so captured decode graphs carry both as their state. Snapshot slots
(``engine/state_snapshots.py``) are copies of a sequence's slot, taken between steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx


class StateArray(NamedTuple):
    """One array of a linear layer's state, for one sequence (mlx-lm's ``ArraysCache`` entry)."""

    shape: tuple[int, ...]
    dtype: mx.Dtype


class StateSpec(NamedTuple):
    """What the state pool holds per sequence: for each linear layer, its arrays."""

    layers: tuple[tuple[StateArray, ...], ...]

    @property
    def bytes_per_sequence(self) -> int:
        return sum(math.prod(a.shape) * a.dtype.size for layer in self.layers for a in layer)

    def pool_bytes(self, num_slots: int, num_snapshots: int = 0) -> int:
        """Bytes a :class:`StatePool` takes (its scratch slot included)."""
        return (num_slots + num_snapshots + 1) * self.bytes_per_sequence


class StatePool:
    """Per linear layer and array, ``[num_slots + num_snapshots + 1, *shape]``: the running
    sequences' slots, the snapshot slots, then the scratch slot that padding rows write to.
    ``state`` is the KV pool's list (see ``KVCache``): this pool's arrays are appended to it, so
    one list is all a captured graph carries."""

    def __init__(self, spec: StateSpec, num_slots: int, state: list[mx.array],
                 num_snapshots: int = 0) -> None:
        self.spec = spec
        self.num_slots = num_slots
        self.num_snapshots = num_snapshots
        self.scratch_slot = num_slots + num_snapshots
        self._state = state
        self._index: list[list[int]] = []  # [layer][array] -> position in state
        for layer in spec.layers:
            self._index.append([])
            for array in layer:
                self._index[-1].append(len(state))
                state.append(mx.zeros((self.scratch_slot + 1, *array.shape), array.dtype))
        mx.eval(state)

    @property
    def nbytes(self) -> int:
        return self.spec.pool_bytes(self.num_slots, self.num_snapshots)

    def read(self, layer: int, array: int, slots: mx.array) -> mx.array:
        """Array ``array`` of linear layer ``layer`` for ``slots[n]``: ``[n, *shape]``."""
        return self._state[self._index[layer][array]][slots]

    def write(self, layer: int, array: int, slots: mx.array, value: mx.array) -> None:
        """Store ``value`` (``[n, *shape]``) in place at ``slots[n]``."""
        self._state[self._index[layer][array]][slots] = value

    def copy(self, copies: list[tuple[int, int]]) -> None:
        """For each ``(source, target)``, slot ``target`` becomes a copy of slot ``source`` (every
        layer's arrays; queued in step order like any write)."""
        sources, targets = (mx.array(slots) for slots in zip(*copies))
        for index in (i for layer in self._index for i in layer):
            self._state[index][targets] = self._state[index][sources]
