"""Hybrid mlx-lm models on the paged engine: their linear layers' state lives in the state pool.

mlx-lm's recurrent layers (gated delta nets, short convolutions, Mamba-2 mixers) read and write
an ``ArraysCache``: ``cache[i]`` is one of the layer's state arrays, ``[batch, ...]``, and the
layer runs its recurrence along the sequence axis of a ``[batch, seq_len, dim]`` input. The
adapter runs the engine's flat batch as ``[T, 1]`` rows (``mlx_lm_adapter.py``): right for
every per-token layer and for attention over the pool, wrong for a recurrence, whose tokens of
one sequence must follow each other. So each recurrent *mixer* (the module that reads the
state: found by the load-time probe, :func:`probe_states`) gets a subclass whose ``__call__``
regroups the step before running mlx-lm's own code:

```
 flat batch [T, 1, D]:  d0 d1 d2 | c c c c c | c c c          decode rows, then prefill chunks
 mixer calls:           [3, 1, D]  [1, 5, D]   [1, 3, D]      mlx-lm's __call__, unchanged
 each with a cache:     slots of   slot of     slot of        GroupState: reads gather from
                        d0 d1 d2   chunk 1     chunk 2        the state pool, writes scatter back
 outputs, back in order -> [T, 1, D]
```

The decode rows go as one batch of one-token sequences (what mlx-lm's batched decode runs); a
prefill chunk as one sequence, continuing the state its earlier chunks left. A sequence's first
tokens start from an empty state: a chunk from position 0 gets mlx-lm's ``None`` (it makes its
own zeros), a one-token row at position 0 zeros. Outside the engine (mlx-lm's own caches) the
mixers run exactly as before.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from pico_vllm.layers.attention import AttentionMetadata
from pico_vllm.layers.state_pool import StateArray, StatePool, StateSpec


class GroupState:
    """What one regrouped mixer call sees as its ``ArraysCache``: the state of ``slots``.

    ``keep[n]`` (decode rows) says whose stored state is real; a row at its sequence's first
    token reads zeros. ``fresh`` (a chunk from position 0) reads ``None``, as mlx-lm's new cache."""

    lengths = None  # no padding inside a group: every row's tokens are all real
    left_padding = None

    def __init__(self, pool: StatePool, layer: int, slots: mx.array, keep: mx.array | None,
                 fresh: bool) -> None:
        self.pool, self.layer, self.slots, self.keep, self.fresh = pool, layer, slots, keep, fresh
        self._written: dict[int, mx.array] = {}

    def __getitem__(self, index: int) -> mx.array | None:
        if index in self._written:
            return self._written[index]
        if self.fresh:
            return None
        state = self.pool.read(self.layer, index, self.slots)
        if self.keep is None:
            return state
        return mx.where(self.keep.reshape(-1, *[1] * (state.ndim - 1)), state, 0)

    def __setitem__(self, index: int, value: mx.array) -> None:
        self._written[index] = value
        self.pool.write(self.layer, index, self.slots, value)

    def advance(self, n: int) -> None:
        """mlx-lm's bookkeeping of padded lengths: nothing to do without padding."""

    def make_mask(self, n: int, **kwargs) -> None:
        return None


class StateView:
    """Linear layer ``layer``'s cache during one paged forward. The model's own code only asks it
    for a mask (none: a group has no padding); its routed mixer hands it the call to regroup."""

    lengths = None
    left_padding = None

    def __init__(self, layer: int, pool: StatePool, meta: AttentionMetadata) -> None:
        self.layer, self.pool, self.meta = layer, pool, meta
        self.calls = 0

    def make_mask(self, n: int, **kwargs) -> None:
        return None

    def __getitem__(self, index: int):
        raise ValueError(f"linear layer {self.layer}'s state was read outside the module the probe "
                         "found to own it")

    __setitem__ = __getitem__

    def run(self, call, args: tuple, kwargs: dict) -> mx.array:
        """``call(*args, **kwargs)`` once per group of the step (see the module docstring), each
        group's arguments and cache its own; the outputs concatenated back into step order."""
        self.calls += 1
        meta = self.meta
        tokens = meta.slot_offsets.shape[0]
        groups = []
        if meta.num_decode_tokens:
            groups.append((0, meta.num_decode_tokens, True,
                           GroupState(self.pool, self.layer, meta.state_slots, meta.context_lens > 1, False)))
        for chunk in meta.prefills:
            slot = mx.array([chunk.state_slot])
            fresh = chunk.context_len == chunk.query_len
            groups.append((chunk.query_start, chunk.query_len, False,
                           GroupState(self.pool, self.layer, slot, None, fresh)))

        def part(value: Any, start: int, n: int, rows: bool, state: GroupState) -> Any:
            if value is self:
                return state
            if isinstance(value, mx.array) and value.ndim >= 2 and value.shape[:2] == (tokens, 1):
                piece = value[start : start + n]
                return piece if rows else piece.swapaxes(0, 1)  # [n, 1, ...] -> [1, n, ...]
            if isinstance(value, mx.array) and value.shape == (tokens,):
                # Per-token positions (a rotary offset some models pass their linear layers):
                # one per row, or a chunk's first as its sequence's offset.
                return value[start : start + n] if rows else value[start : start + 1]
            return value

        outputs = []
        for start, n, rows, state in groups:
            out = call(*(part(a, start, n, rows, state) for a in args),
                       **{k: part(v, start, n, rows, state) for k, v in kwargs.items()})
            outputs.append(out if rows else out.swapaxes(0, 1))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)


class ProbeStateView:
    """Linear layer ``layer``'s cache during the load-time probe (mlx-lm's code, not yet routed):
    records the arrays the layer writes and the module that reads and writes them."""

    lengths = None
    left_padding = None

    def __init__(self, layer: int, size: int) -> None:
        self.layer, self.size = layer, size
        self.arrays: dict[int, StateArray] = {}
        self.owners: set[int] = set()
        self.owner: nn.Module | None = None
        self._written: dict[int, mx.array] = {}

    def _record_owner(self) -> None:
        caller = sys._getframe(2).f_locals.get("self")  # the method that indexed the cache
        if isinstance(caller, nn.Module):
            self.owners.add(id(caller))
            self.owner = caller
        else:
            self.owners.add(id(None))

    def __getitem__(self, index: int) -> mx.array | None:
        self._record_owner()
        return self._written.get(index)

    def __setitem__(self, index: int, value: mx.array) -> None:
        self._record_owner()
        self._written[index] = value
        self.arrays[index] = StateArray(tuple(value.shape[1:]), value.dtype)

    def advance(self, n: int) -> None:
        pass

    def make_mask(self, n: int, **kwargs) -> None:
        return None


@functools.cache
def recurrent_mixer_class(cls: type) -> type:
    """``cls`` (a module that keeps a linear layer's state) running its own ``__call__`` once per
    group of the step when it is handed a :class:`StateView`; unchanged for any other cache."""

    def __call__(self, *args, **kwargs):
        view = next((a for a in (*args, *kwargs.values()) if isinstance(a, StateView)), None)
        if view is None:
            return cls.__call__(self, *args, **kwargs)
        return view.run(functools.partial(cls.__call__, self), args, kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def route_mixers(model_type: str, views: list[ProbeStateView]) -> StateSpec:
    """After a probe forward with ``views``: give each linear layer's mixer its regrouping class
    and return the state each sequence needs; ValueError naming a layer the engine cannot hold."""
    layers = []
    for view in views:
        where = f"mlx-lm's {model_type!r} linear layer {view.layer}"
        if view.owner is None or len(view.owners) != 1:
            raise ValueError(f"{where}: its state is read or written outside one module (or not at "
                             "all), so the paged engine cannot tell which code runs its recurrence")
        if sorted(view.arrays) != list(range(view.size)):
            raise ValueError(f"{where} wrote state arrays {sorted(view.arrays)} of its {view.size}; "
                             "the state pool holds each of them")
        view.owner.__class__ = recurrent_mixer_class(type(view.owner))
        layers.append(tuple(view.arrays[i] for i in range(view.size)))
    return StateSpec(tuple(layers))
