"""pico-vllm's paged decode attention: the Metal kernels and their pure-MLX reference, behind one
function, :func:`paged_attention`. This package depends on MLX only.

``paged_attention`` runs the kernels when it can -- Metal is there, the inputs are covered, and
*this template instance* passed its self-check -- and the reference otherwise. Every instance
(dtype, head_dim, block size, query heads per threadgroup, simdgroups) is checked the first time
it is asked for, in the caller's dtype, against the reference, evaluated at once: MLX builds a
kernel library lazily, when a graph is evaluated, so an instance that fails to build would
otherwise surface inside a model step. A failure (a build error or a wrong result) is logged
once and sends that instance to the reference for the life of the process: wrong tokens are
never an option. The engine calls :func:`prepare` when it starts, so no check ever runs inside
a graph ``mx.compile`` is tracing (where nothing may be evaluated).
"""

from __future__ import annotations

import logging

import mlx.core as mx

from metal_kernels.cascade import paged_partials_reference, shared_prefix_partials
from metal_kernels.kernel import (
    instance,
    merge_partitions,
    paged_attention_kernel,
    paged_attention_partials,
    unsupported_reason,
)
from metal_kernels.reference import merge_partitions_reference, paged_attention_reference

__all__ = ["cascade_attention", "metal_available", "paged_attention", "paged_attention_metal",
           "paged_attention_reference", "prepare"]

logger = logging.getLogger("pico_vllm.metal")

# How far the kernel may be from the reference, relative to 1 + |reference|: both read the same
# inputs in the same dtype; they differ by accumulation order and by rounding the output once
# (bf16 alone: ~4e-3).
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}

_verdicts: dict[tuple, bool] = {}  # template instance -> passed its self-check
_reported: set[str] = set()


def metal_available() -> bool:
    """True when MLX computes on an Apple GPU (the one such test in the project)."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
    *,
    window: int | None = None,
    sinks: mx.array | None = None,
    softcap: float | None = None,
) -> mx.array:
    """Decode attention over the paged pool: the Metal kernels where they run, else the reference.

    Same contract as :func:`paged_attention_reference`, variants included.
    """
    variants = dict(window=window, sinks=sinks, softcap=softcap)
    out = paged_attention_metal(q, k_pool, v_pool, block_tables, context_lens, scale, **variants)
    if out is not None:
        return out
    return paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, scale, **variants)


def paged_attention_metal(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
    *,
    window: int | None = None,
    sinks: mx.array | None = None,
    softcap: float | None = None,
) -> mx.array | None:
    """The kernels' ``[B, Hq, D]`` output, or ``None`` when the caller must use the reference."""
    if not _kernels_serve(q, k_pool, v_pool, block_tables, context_lens, sinks):
        return None
    return paged_attention_kernel(q, k_pool, v_pool, block_tables, context_lens, scale,
                                  window=window, sinks=sinks, softcap=softcap)


def cascade_attention(
    q: mx.array, k_pool: mx.array, v_pool: mx.array, shared_tables: mx.array, set_rows: mx.array,
    set_lens: mx.array, row_slots: mx.array, suffix_tables: mx.array, suffix_lens: mx.array,
    scale: float, *, sinks: mx.array | None = None, softcap: float | None = None,
) -> mx.array:
    """Decode attention of ``q[B, Hq, D]`` where sets of rows share leading blocks: set ``s``'s
    members ``set_rows[s]`` read the first ``set_lens[s, r]`` tokens of ``shared_tables[s]``
    (rows find their slot through ``row_slots``; see :func:`shared_prefix_partials`), and every
    row ``b`` then its own ``suffix_lens[b]`` tokens through ``suffix_tables[b]``. Returns
    ``[B, Hq, D]`` in ``q``'s dtype, equal to ``paged_attention_reference`` over the whole tables
    (no window: a window's start moves with each row). On Metal the own blocks run through the
    kernel's pass 1 and everything merges in its pass 2; elsewhere both are the MLX reference."""
    shared = shared_prefix_partials(q, k_pool, v_pool, shared_tables, set_rows, set_lens, row_slots,
                                    scale, softcap)
    on_metal = _kernels_serve(q, k_pool, v_pool, suffix_tables, suffix_lens, sinks)
    if on_metal:
        own = paged_attention_partials(q, k_pool, v_pool, suffix_tables, suffix_lens, scale, softcap=softcap)
    else:
        own = paged_partials_reference(q, k_pool, v_pool, suffix_tables, suffix_lens, scale, softcap)
    o_part = mx.concatenate([shared[0], own[0]], axis=2)
    ml_part = mx.concatenate([shared[1], own[1]], axis=2)
    if on_metal:
        return merge_partitions(o_part, ml_part, q.dtype, sinks)
    return merge_partitions_reference(o_part, ml_part, sinks).astype(q.dtype)


def _kernels_serve(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array,
                   context_lens: mx.array, sinks: mx.array | None) -> bool:
    """True when the Metal kernels take these inputs: Metal is there, the inputs are covered
    (the reason they are not is logged once), and the instance passed its self-check."""
    if not metal_available():
        return False
    reason = unsupported_reason(q, k_pool, v_pool, block_tables, context_lens, sinks)
    if reason is not None:
        if reason not in _reported:
            _reported.add(reason)
            logger.debug("paged attention falls back to the MLX reference: %s", reason)
        return False
    num_kv_heads, _, block_size, head_dim = k_pool.shape
    return prepare(q.dtype, q.shape[1], num_kv_heads, head_dim, block_size)


def prepare(dtype: mx.Dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Self-check the kernel instance these shapes use, now, unless it was checked already;
    True when the kernels will serve it. Off Metal, or for inputs the kernel does not take,
    False without a check."""
    if not metal_available():
        return False
    key = instance(dtype, num_q_heads, num_kv_heads, head_dim, block_size)
    if key not in _verdicts:
        _verdicts[key] = _self_check(key, dtype, num_q_heads // num_kv_heads, head_dim, block_size)
    return _verdicts[key]


def self_check_cases(dtype: mx.Dtype, group: int, head_dim: int, block_size: int) -> list[tuple]:
    """Inputs that exercise an instance the way the model will: 2 KV heads of ``group`` query
    heads, contexts spanning several partitions, a context-0 (padding) row and one longer than
    its table, shuffled blocks; batches of 3 and 9 (MLX passes small inputs in the ``constant``
    address space, so batches under and over 8 get differently generated kernels). Each case is
    ``(args, variants)``: the batch of 9 also runs a window, softcapping and sinks (run-time
    values of the same pipeline)."""
    keys = iter(mx.random.split(mx.random.key(0), 9))
    num_kv_heads, width = 2, -(-600 // block_size) + 1
    num_blocks = 9 * width + 1
    k_pool = mx.random.normal((num_kv_heads, num_blocks, block_size, head_dim), key=next(keys)).astype(dtype)
    v_pool = mx.random.normal((num_kv_heads, num_blocks, block_size, head_dim), key=next(keys)).astype(dtype)
    order = mx.random.permutation(num_blocks, key=next(keys)).astype(mx.int32)
    sinks = mx.random.normal((num_kv_heads * group,), key=next(keys))
    cases = []
    for lengths, variants in (
        ([0, 37, 10_000], {}),
        ([1, block_size, block_size + 1, 0, 200, 600, 317, 10_000, 45],
         dict(window=3 * block_size + 5, softcap=30.0, sinks=sinks)),
    ):
        batch = len(lengths)
        # Scores of spread ~3: peaked attention, as trained models have, so that an error in the
        # output is not averaged away over many tokens.
        q = 3 * mx.random.normal((batch, num_kv_heads * group, head_dim), key=next(keys))
        q = q.astype(dtype)
        tables = order[: batch * width].reshape(batch, width)
        args = (q, k_pool, v_pool, tables, mx.array(lengths, dtype=mx.int32), head_dim**-0.5)
        cases.append((args, variants))
    return cases


def _self_check(key: tuple, dtype: mx.Dtype, group: int, head_dim: int, block_size: int) -> bool:
    try:
        error = 0.0
        for args, variants in self_check_cases(dtype, group, head_dim, block_size):
            got = paged_attention_kernel(*args, **variants).astype(mx.float32)
            want = paged_attention_reference(*args, **variants).astype(mx.float32)
            gap = mx.max(mx.abs(got - want) / (1 + mx.abs(want)))
            mx.eval(gap)  # here, inside the try: builds the instance's pipelines now
            error = max(error, gap.item() if gap.item() == gap.item() else float("inf"))  # NaN fails
    except Exception as e:  # a kernel that fails to build or run fails its check
        logger.warning("Metal paged-attention kernel %s failed its self-check (%s); that instance "
                       "uses the MLX reference in this process", _name(key), e)
        return False
    if not error <= TOLERANCE[dtype]:
        logger.warning("Metal paged-attention kernel %s failed its self-check (error %.3g over "
                       "%.0e); that instance uses the MLX reference in this process",
                       _name(key), error, TOLERANCE[dtype])
        return False
    return True


def _name(key: tuple) -> str:
    dtype, head_dim, block_size, gq, nsg = key
    return f"<{str(dtype).removeprefix('mlx.core.')}, D={head_dim}, BS={block_size}, GQ={gq}, NSG={nsg}>"
