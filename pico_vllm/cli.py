"""``pico-vllm generate`` streams a generation to the terminal and reports throughput;
``pico-vllm bench`` runs the benchmark sandbox (see ``pico_vllm/bench.py``)."""

from __future__ import annotations

import argparse
import sys
import time

from pico_vllm.config import EngineConfig
from pico_vllm.llm import LLM
from pico_vllm.sampling_params import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pico-vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", default=None,
                     help="HF id, local HF folder or .gguf file (default: embedded SmolLM2-135M)")
    gen.add_argument("--prompt", default="Hello, my name is", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--num-requests", type=int, default=1,
                     help="run this many copies of the request concurrently (request i uses seed+i); "
                          "the first one is streamed")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    gen.add_argument("--block-size", type=int, default=16)
    gen.add_argument("--num-blocks", type=int, default=None)
    gen.add_argument("--max-num-seqs", type=int, default=64)
    gen.add_argument("--max-num-batched-tokens", type=int, default=2048)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--no-prefix-caching", action="store_true")
    gen.add_argument("--enforce-eager", action="store_true",
                     help="run decode steps eagerly instead of through captured graphs")
    gen.add_argument("--capture-graphs", default="lazy", choices=["lazy", "eager"],
                     help="trace each decode graph on first use (lazy) or all at start-up (eager)")
    gen.add_argument("--no-async-scheduling", action="store_true",
                     help="read every step back before queueing the next")

    from pico_vllm.bench import ENGINES, WORKLOADS

    bench = commands.add_parser("bench", help="benchmark pico-vllm against mlx-lm on named workloads")
    bench.add_argument("--model", default=None,
                       help="HF id, local HF folder or .gguf file (default: embedded SmolLM2-135M)")
    bench.add_argument("--workload", action="append", choices=WORKLOADS, default=None,
                       help="workload to run (repeatable; default: all)")
    bench.add_argument("--engine", action="append", choices=ENGINES, default=None,
                       help="engine to run (repeatable; default: all)")
    bench.add_argument("--quick", action="store_true", help="small workloads (the `make run` sandbox)")
    bench.add_argument("--rates", default=None,
                       help="online request rates per second, comma-separated "
                            "(default: 1,2 with --quick, else 0.5,1,2,4)")
    bench.add_argument("--max-num-seqs", type=int, default=32,
                       help="concurrent sequences for pico-vllm and mlx-lm's BatchGenerator alike")
    bench.add_argument("--output", default="bench-results", help="folder for results.json and the plots")
    return parser


def generate(args: argparse.Namespace) -> None:
    config = EngineConfig(
        model=args.model, dtype=args.dtype, block_size=args.block_size, num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager, capture_graphs=args.capture_graphs,
        async_scheduling=not args.no_async_scheduling,
    )
    started = time.perf_counter()
    llm = LLM(**vars(config))
    print(f"[pico-vllm] loaded {config.model or 'embedded SmolLM2-135M-Instruct'} in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    prompt = (llm.apply_chat_template([{"role": "user", "content": args.prompt}])
              if args.chat else args.prompt)
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    params = [
        SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
            seed=None if args.seed is None else args.seed + i,
        )
        for i in range(args.num_requests)
    ]
    if not args.chat:
        print(args.prompt, end="", flush=True)
    stats = llm.engine.stats
    before = (stats.prompt_tokens, stats.generated_tokens)
    started = time.perf_counter()
    first = None
    for out in llm.stream([prompt] * args.num_requests, params):
        first = first or out.request_id
        if out.request_id == first:
            print(out.delta_text, end="", flush=True)
    elapsed = time.perf_counter() - started
    generated = stats.generated_tokens - before[1]
    print(
        f"\n[pico-vllm] {args.num_requests} request(s): {stats.prompt_tokens - before[0]} prompt + "
        f"{generated} generated tokens in {elapsed:.2f}s = {generated / elapsed:.1f} tok/s "
        f"(cached prompt tokens: {stats.cached_prompt_tokens}, preemptions: {stats.preemptions})",
        file=sys.stderr,
    )


def run_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pico_vllm.bench import ENGINES, WORKLOADS, benchmark, format_table, save

    default_rates = "1,2" if args.quick else "0.5,1,2,4"
    try:
        rates = [float(r) for r in (args.rates or default_rates).split(",")]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers, got {args.rates!r}") from None
    if any(r <= 0 for r in rates):
        raise ValueError(f"--rates must be positive, got {args.rates!r}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    results, facts = benchmark(
        args.model, args.workload or list(WORKLOADS), args.engine or list(ENGINES), args.quick,
        rates, args.max_num_seqs,
    )
    print(f"model {facts['model']} ({facts['parameters'] / 1e6:.0f}M parameters) on {facts['device']}; "
          f"peak fp32 matmul {facts['peak_matmul_flops'] / 1e9:.1f} GFLOP/s")
    print(format_table(results, facts))
    paths = save(results, facts, Path(args.output))
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "bench":
            run_bench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pico-vllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
