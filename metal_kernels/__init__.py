"""pico-vllm's paged decode attention: the Metal kernel and its pure-MLX reference, behind one
function, :func:`paged_attention`. This package depends on MLX only.

``paged_attention`` runs the kernel when it can — Metal is there, the shapes are covered, and
the kernel passed its self-check — and the reference otherwise. On the first use on a Mac the
kernel is checked against the reference on a small random case; a mismatch switches this process
to the reference for good: wrong tokens are never an option.
"""

from __future__ import annotations

import logging

import mlx.core as mx

from metal_kernels.kernel import paged_attention_kernel, unsupported_reason
from metal_kernels.reference import paged_attention_reference

__all__ = ["metal_available", "paged_attention", "paged_attention_metal", "paged_attention_reference"]

logger = logging.getLogger("pico_vllm.metal")

_self_check: dict[str, bool] = {}  # "passed" -> bool, once run
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
) -> mx.array:
    """Decode attention over the paged pool: the Metal kernel where it runs, else the reference.

    Same contract as :func:`paged_attention_reference`.
    """
    out = paged_attention_metal(q, k_pool, v_pool, block_tables, context_lens, scale)
    if out is not None:
        return out
    return paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, scale)


def paged_attention_metal(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array | None:
    """The kernel's ``[B, Hq, D]`` output, or ``None`` when the caller must use the reference."""
    if not metal_available():
        return None
    reason = unsupported_reason(q, k_pool)
    if reason is not None:
        if reason not in _reported:
            _reported.add(reason)
            logger.debug("paged attention falls back to the MLX reference: %s", reason)
        return None
    if not self_check_passed():
        return None
    return paged_attention_kernel(q, k_pool, v_pool, block_tables, context_lens, scale)


def self_check_passed() -> bool:
    """Compare kernel and reference once per process on a small random case."""
    if "passed" not in _self_check:
        _self_check["passed"] = _run_self_check()
    return _self_check["passed"]


def _run_self_check() -> bool:
    key = mx.random.key(0)
    k1, k2, k3 = mx.random.split(key, 3)
    num_blocks, block_size, head_dim = 48, 16, 64
    q = mx.random.normal((3, 8, head_dim), key=k1)
    k_pool = mx.random.normal((2, num_blocks, block_size, head_dim), key=k2)
    v_pool = mx.random.normal((2, num_blocks, block_size, head_dim), key=k3)
    tables = mx.array([list(range(i, 45, 3)) for i in range(3)], dtype=mx.int32)  # interleaved
    lengths = mx.array([1, 17, 700 % (15 * block_size)], dtype=mx.int32)
    try:
        got = paged_attention_kernel(q, k_pool, v_pool, tables, lengths, head_dim**-0.5)
        want = paged_attention_reference(q, k_pool, v_pool, tables, lengths, head_dim**-0.5)
        error = mx.abs(got - want).max().item()
    except Exception as e:  # a kernel that fails to compile or run is a failed check too
        logger.warning("Metal paged-attention kernel failed its self-check (%s); using the "
                       "MLX reference in this process", e)
        return False
    if not error < 1e-3:
        logger.warning("Metal paged-attention kernel failed its self-check (max error %.3g); "
                       "using the MLX reference in this process", error)
        return False
    return True
