"""How much memory the engine takes: the KV pool's size (from a budget, or what the weights leave
of a Mac's GPU working set) and, on a Mac, MLX's wired limit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from metal_kernels import metal_available
from pico_vllm.config import CPU_KV_CACHE_BYTES, EngineConfig
from pico_vllm.pipeline import parameter_bytes

# Fraction of the free Metal working set the KV pool may take (the rest: activations, MLX cache).
METAL_KV_FRACTION = 0.8


def metal_kv_budget(working_set: int, weights: int) -> int:
    """Bytes for the KV pool on a Mac: ``METAL_KV_FRACTION`` of the GPU working set the weights
    leave; ValueError with the numbers when they leave none."""
    budget = int((working_set - weights) * METAL_KV_FRACTION)
    if budget <= 0:
        raise ValueError(
            f"the model's weights ({weights / 2**30:.1f} GiB) leave no room for a KV cache in this "
            f"Mac's GPU working set ({working_set / 2**30:.1f} GiB): serve a smaller or more quantized "
            "model, or set the pool's size with --kv-cache-bytes or --num-blocks"
        )
    return budget


def wire_memory() -> int | None:
    """On a Mac, let MLX keep up to the GPU's recommended working set wired (resident, never
    paged out), as mlx-lm does while it generates: the weights and the KV pool fit in it (the
    pool is sized from what the weights leave of it). Returns the limit set, or None off Metal.
    Without it macOS may page a large model's buffers out between steps."""
    if not metal_available():
        return None
    limit = metal_working_set()
    mx.set_wired_limit(limit)
    return limit


def metal_working_set() -> int:
    """The Apple GPU's recommended working set, in bytes."""
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return info["max_recommended_working_set_size"]


def state_pool_bytes(config: EngineConfig, model: nn.Module) -> int:
    """Bytes a hybrid model's state pool takes: a slot per running sequence, the prefix cache's
    snapshots and the scratch slot (``layers/state_pool.py``); 0 for a model without linear
    layers."""
    spec = model.state_spec
    return 0 if spec is None else spec.pool_bytes(config.max_num_seqs, config.num_state_snapshots or 0)


def resolve_num_blocks(config: EngineConfig, model: nn.Module, dtype: mx.Dtype) -> int:
    """Blocks in the pool: ``config.num_blocks``, else what the KV memory budget leaves after a
    hybrid's state pool, / bytes per block."""
    if config.num_blocks is not None:
        return config.num_blocks
    budget = config.kv_cache_bytes
    if budget is None and metal_available():
        weights = parameter_bytes(model)
        budget = metal_kv_budget(metal_working_set(), weights)
    if budget is None:
        budget = CPU_KV_CACHE_BYTES
    states = state_pool_bytes(config, model)
    block_bytes = model.kv_spec.bytes_per_block(config.block_size, dtype)
    num_blocks = (budget - states) // block_bytes
    if num_blocks < 1:
        left = (f", of which the state pool takes {states} ({config.max_num_seqs} sequences, "
                f"{config.num_state_snapshots or 0} snapshots),") * bool(states)
        raise ValueError(f"KV memory budget of {budget} bytes{left} holds no block of this model "
                         f"({block_bytes} bytes): raise --kv-cache-bytes"
                         + (", lower --max-num-seqs or --num-state-snapshots" if states else "")
                         + " or give --num-blocks")
    return num_blocks
