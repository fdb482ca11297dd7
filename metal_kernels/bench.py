"""Time the paged-attention kernels (both passes) against the pure-MLX reference and against
``mx.fast.scaled_dot_product_attention`` on contiguous KV -- MLX's ``sdpa_vector``, the speed to
aim for -- at batch 1/8/32 and contexts 256/1k/4k, for each dtype asked (default fp16 and bf16).

    uv run python -m metal_kernels.bench [--dtype float16 --dtype bfloat16] [--head-dim 128] [--group 4]
        [--window 1024]

Needs a Mac (Metal); elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from metal_kernels import metal_available, prepare
from metal_kernels.kernel import launch_config, paged_attention_kernel
from metal_kernels.reference import paged_attention_reference


def timeit(fn, *args, repeats: int = 20) -> float:
    """Median seconds per call, after a warm-up."""
    mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_table(dtype: mx.Dtype, hkv: int, group: int, d: int, bs: int, window: int | None = None) -> None:
    hq = hkv * group
    checked = "passed" if prepare(dtype, hq, hkv, d, bs) else "FAILED (the engine would use the reference)"
    print(f"dtype={str(dtype).removeprefix('mlx.core.')} head_dim={d} q_heads={hq} kv_heads={hkv} "
          f"block_size={bs} window={window}; self-check {checked}")
    print(f"{'batch':>5} {'context':>7} {'parts':>5} {'kernel ms':>10} {'reference ms':>13} {'sdpa ms':>8} "
          f"{'kernel/sdpa':>11} {'ref/kernel':>10}")
    for batch in (1, 8, 32):
        for context in (256, 1024, 4096):
            blocks = -(-context // bs)
            q = mx.random.normal((batch, hq, d)).astype(dtype)
            k_pool = mx.random.normal((hkv, batch * blocks, bs, d)).astype(dtype)
            v_pool = mx.random.normal((hkv, batch * blocks, bs, d)).astype(dtype)
            tables = mx.random.permutation(batch * blocks).astype(mx.int32).reshape(batch, blocks)
            lens = mx.full((batch,), context, dtype=mx.int32)
            k_dense = mx.random.normal((batch, hkv, context, d)).astype(dtype)
            v_dense = mx.random.normal((batch, hkv, context, d)).astype(dtype)
            scale = d**-0.5
            args_paged = (q, k_pool, v_pool, tables, lens, scale)
            parts = launch_config(q, k_pool, tables, window=window)["output_shapes"][0][2]
            kernel = timeit(lambda *a: paged_attention_kernel(*a, window=window), *args_paged)
            reference = timeit(lambda *a: paged_attention_reference(*a, window=window), *args_paged)
            if window is not None:  # sdpa over the window's keys: what a windowed layer must read
                k_dense, v_dense = k_dense[:, :, -window:], v_dense[:, :, -window:]
            sdpa = timeit(
                lambda q, k, v, s=scale: mx.fast.scaled_dot_product_attention(q[:, :, None], k, v, scale=s),
                q, k_dense, v_dense,
            )
            print(f"{batch:>5} {context:>7} {parts:>5} {kernel * 1e3:>10.3f} {reference * 1e3:>13.3f} "
                  f"{sdpa * 1e3:>8.3f} {kernel / sdpa:>11.2f} {reference / kernel:>10.2f}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", action="append", choices=["float16", "bfloat16", "float32"],
                        help="repeatable (default: float16 and bfloat16)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=None,
                        help="time a sliding-window layer (e.g. 1024): the kernel reads the window only")
    args = parser.parse_args(argv)
    if not metal_available():
        print("metal_kernels.bench needs Metal (an Apple-silicon Mac); nothing to time here.")
        return 0

    for name in args.dtype or ["float16", "bfloat16"]:
        run_table(getattr(mx, name), args.kv_heads, args.group, args.head_dim, args.block_size, args.window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
