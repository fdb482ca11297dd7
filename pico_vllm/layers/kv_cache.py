"""The paged KV pool: what it holds per block, how the model's layers share it, and the writes.

A model whose layers all see the whole context has one *layer group*: every block holds one
slot per layer. A model with sliding-window layers (Gemma 3: five local layers to one global)
has several, as in vLLM's hybrid KV-cache manager: layers are grouped by window into groups of
equal size ``S`` (the size of the smallest window class; a larger class is split into several
groups), and a block holds ``S`` layer slots -- for *one* group's layers, whichever group took
it. Group ``g``'s layer ``j`` uses slot ``j`` of the blocks in group ``g``'s block tables. So a
sliding group's blocks can go back to the pool as its window moves on (see ``BlockManager``)
while the full-attention groups keep theirs, and memory follows what each group still reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx

from pico_vllm.layers.state_pool import StatePool, StateSpec

if TYPE_CHECKING:
    from pico_vllm.layers.attention import AttentionMetadata


class KVLayout(NamedTuple):
    """Which group and which per-block slot each layer uses, and each group's window."""

    group_of: tuple[int, ...]  # per layer
    slot_of: tuple[int, ...]  # per layer
    windows: tuple[int | None, ...]  # per group: sliding window in tokens, None for full attention
    slots: int  # layer slots per block


def kv_layout(layer_windows: tuple[int | None, ...]) -> KVLayout:
    """Group layers by window, each group ``slots`` layers (the smallest window class's size)."""
    classes = {w: [i for i, lw in enumerate(layer_windows) if lw == w] for w in dict.fromkeys(layer_windows)}
    slots = min(len(layers) for layers in classes.values())
    group_of, slot_of, windows = [0] * len(layer_windows), [0] * len(layer_windows), []
    for window, layers in classes.items():
        for start in range(0, len(layers), slots):
            for slot, layer in enumerate(layers[start : start + slots]):
                group_of[layer], slot_of[layer] = len(windows), slot
            windows.append(window)
    return KVLayout(tuple(group_of), tuple(slot_of), tuple(windows), slots)


class KVSpec(NamedTuple):
    """What the KV pool must hold for a model (per rank, once tensor parallelism shards heads)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int  # not held by the pool, but with it, it names the decode kernel's instance
    layer_windows: tuple[int | None, ...] | None = None  # per layer; None: full attention throughout

    @property
    def layout(self) -> KVLayout:
        return kv_layout(self.layer_windows or (None,) * self.num_layers)

    def bytes_per_block(self, block_size: int, dtype: mx.Dtype) -> int:
        """Bytes one block takes: keys and values of its layer slots."""
        return 2 * self.layout.slots * self.num_kv_heads * block_size * self.head_dim * dtype.size


class KVCache:
    """The paged KV pool: per layer slot, keys and values of shape ``[Hkv, num_blocks + 1, BS, D]``.

    Head-major, so a gather of a sequence's blocks is already its dense per-head context (see
    ``metal_kernels/reference.py``). The extra last block is the *scratch block*: no sequence
    ever owns it, and the padding rows of a compiled decode step write there.

    ``state`` is one list that lives as long as the pool: slot ``s``'s keys are ``state[s]``,
    its values ``state[slots + s]``, then a hybrid model's recurrent state (``states``). Writes
    update those arrays in place (``pool[idx] = kv`` donates the old buffer to the scatter, so a
    step costs O(tokens written), never a copy of the pool), which is what lets ``mx.compile``
    take the list as the graph's state.
    """

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int, dtype: mx.Dtype,
                 state_spec: StateSpec | None = None, num_state_slots: int = 0,
                 num_state_snapshots: int = 0) -> None:
        """``state_spec``: a hybrid model's recurrent state per sequence, held in
        ``num_state_slots`` slots of :attr:`states` (see ``state_pool.py``), with
        ``num_state_snapshots`` more for its prefix cache."""
        self.layout = spec.layout
        shape = (spec.num_kv_heads, num_blocks + 1, block_size, spec.head_dim)
        self.state = [mx.zeros(shape, dtype) for _ in range(2 * self.layout.slots)]
        self.block_size = block_size
        self.scratch_block = num_blocks
        self._heads = mx.arange(spec.num_kv_heads)[:, None]
        mx.eval(self.state, self._heads)
        self.states = None if state_spec is None else StatePool(state_spec, num_state_slots, self.state,
                                                                  num_state_snapshots)

    def group(self, layer: int) -> int:
        """The layer group whose block tables ``layer`` reads (``AttentionMetadata``'s first axis)."""
        return self.layout.group_of[layer]

    def keys(self, layer: int) -> mx.array:
        return self.state[self.layout.slot_of[layer]]

    def values(self, layer: int) -> mx.array:
        return self.state[self.layout.slots + self.layout.slot_of[layer]]

    def write(self, layer: int, k: mx.array, v: mx.array, meta: AttentionMetadata) -> None:
        """Store ``k``/``v`` (``[T, Hkv, D]``) of the step's tokens at their slots."""
        # Three broadcast index arrays [Hkv, 1] x [1, T] select [Hkv, T] rows of D values.
        index = (self._heads, meta.slot_blocks[self.group(layer)][None], meta.slot_offsets[None])
        slot = self.layout.slot_of[layer]
        self.state[slot][index] = k.swapaxes(0, 1)
        self.state[self.layout.slots + slot][index] = v.swapaxes(0, 1)
