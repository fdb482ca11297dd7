"""``pico-vllm bench``: named workloads, every engine on exactly the same requests, in one process.

Engines, each given the same random token-id prompts with ``ignore_eos`` (so each produces the
same number of tokens), on the same weights:

- ``pico-vllm``: this engine, decode steps through captured graphs;
- ``pico-vllm eager``: the same with ``enforce_eager=True``;
- ``mlx-lm batch``: mlx-lm's continuous-batching ``BatchGenerator``;
- ``mlx-lm sequential``: mlx-lm's ``generate_step``, one request after the other (naive serving).

Workloads: ``mixed`` (many requests, prompt and output lengths uniform in ranges: nano-vllm's
bench shape, scaled to a laptop), ``shared-prefix`` (requests sharing a long system prompt),
``single`` (one stream), and ``online`` (Poisson arrivals in real time through ``LLMEngine``,
reporting vLLM's ``bench serve`` metrics — TTFT, TPOT, ITL — over a sweep of rates; pico-vllm
only). The table gives tokens/s, each engine's ratio to the two mlx-lm baselines, and the
fraction of this machine's peak matmul FLOP/s (measured in the same run) the engine achieved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from pico_vllm.config import EngineConfig
from pico_vllm.engine.llm_engine import LLMEngine
from pico_vllm.loader import LoadedModel, load
from pico_vllm.sampling_params import SamplingParams

ENGINES = ("pico-vllm", "pico-vllm eager", "mlx-lm batch", "mlx-lm sequential")
WORKLOADS = ("mixed", "shared-prefix", "single", "online")


@dataclass
class Workload:
    """Requests as (prompt token ids, output length)."""

    name: str
    requests: list[tuple[list[int], int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p, _ in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.requests)


@dataclass
class Result:
    workload: str
    engine: str
    seconds: float
    prompt_tokens: int
    output_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(name: str, vocab_size: int, quick: bool, seed: int = 0) -> Workload:
    """The named workload's requests: random token ids (from 10, clear of special tokens)."""
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> list[int]:
        return rng.integers(10, vocab_size, size=int(n)).tolist()

    if name == "mixed":
        n, prompt, output = (8, (32, 64), (16, 32)) if quick else (32, (64, 256), (32, 128))
        return Workload(name, [
            (tokens(rng.integers(*prompt, endpoint=True)), int(rng.integers(*output, endpoint=True)))
            for _ in range(n)
        ])
    if name == "shared-prefix":
        n, shared, own, output = (8, 128, 16, 16) if quick else (16, 256, 64, 32)
        system = tokens(shared)
        return Workload(name, [(system + tokens(own), output) for _ in range(n)])
    if name == "single":
        prompt, output = (32, 32) if quick else (128, 128)
        return Workload(name, [(tokens(prompt), output)])
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def run_pico(engine: LLMEngine, workload: Workload) -> tuple[float, int]:
    """Seconds for pico-vllm to finish every request (all submitted at once), tokens produced."""
    for prompt, n in workload.requests:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    started = time.perf_counter()
    produced = 0
    while engine.has_unfinished_requests():
        produced += sum(len(out.delta_token_ids) for out in engine.step())
    return time.perf_counter() - started, produced


def run_mlx_lm_batch(model: nn.Module, workload: Workload, max_num_seqs: int) -> tuple[float, int]:
    """Seconds for mlx-lm's ``BatchGenerator`` (no stop tokens: ``ignore_eos``)."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, completion_batch_size=max_num_seqs)
    started = time.perf_counter()
    generator.insert([p for p, _ in workload.requests], [n for _, n in workload.requests])
    produced = 0
    while responses := generator.next_generated():
        produced += len(responses)
    generator.close()
    return time.perf_counter() - started, produced


def run_mlx_lm_sequential(model: nn.Module, workload: Workload) -> tuple[float, int]:
    """Seconds for mlx-lm's ``generate_step``, one request after the other."""
    from mlx_lm.generate import generate_step

    started = time.perf_counter()
    produced = 0
    for prompt, n in workload.requests:
        produced += sum(1 for _ in generate_step(mx.array(prompt), model, max_tokens=n))
    return time.perf_counter() - started, produced


def run_online(engine: LLMEngine, workload: Workload, rate: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` requests/s through ``LLMEngine`` in real time; latencies in
    seconds: TTFT (arrival -> first token), TPOT (mean gap after the first token, per request),
    ITL (every gap between tokens)."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, size=len(workload.requests))
    arrivals = np.cumsum(gaps) - gaps[0]
    start = time.perf_counter()
    pending = list(zip(arrivals, workload.requests))
    token_times: dict[str, list[float]] = {}
    arrived: dict[str, float] = {}
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, (prompt, n) = pending.pop(0)
            rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            arrived[rid], token_times[rid] = at, []
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        for out in engine.step():
            token_times[out.request_id] += [time.perf_counter() - start] * len(out.delta_token_ids)
    elapsed = time.perf_counter() - start
    ttft = [times[0] - arrived[rid] for rid, times in token_times.items()]
    itl = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times.values() if len(t) > 1]
    return {
        "rate": rate, "seconds": elapsed,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation), 0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


def mlx_lm_twin(loaded: LoadedModel) -> nn.Module:
    """mlx-lm's own model class for the same config, holding the very same weight arrays."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{loaded.config['model_type']}")
    twin = module.Model(module.ModelArgs.from_dict(loaded.config))
    twin.load_weights(tree_flatten(loaded.model.parameters()), strict=False)
    twin.set_dtype(loaded.dtype)
    mx.eval(twin.parameters())
    return twin


def peak_matmul_flops(dim: int, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s on a large square-ish GEMM (the roofline to compare to)."""
    a, b = mx.random.normal((512, dim)), mx.random.normal((dim, 4 * dim))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return 2 * 512 * dim * 4 * dim / best


def benchmark(
    model: str | None,
    workloads: list[str],
    engines: list[str],
    quick: bool,
    rates: list[float],
    max_num_seqs: int = 32,
    progress: bool = True,
) -> tuple[list[Result], dict]:
    """Run ``workloads`` x ``engines``; returns the results and the machine facts."""
    loaded = load(model)
    num_params = sum(p.size for _, p in tree_flatten(loaded.model.parameters()))
    vocab = loaded.config["vocab_size"]
    facts = {"model": loaded.name, "parameters": num_params,
             "peak_matmul_flops": peak_matmul_flops(loaded.config["hidden_size"]),
             "device": str(mx.default_device()), "quick": quick}
    twin = mlx_lm_twin(loaded) if {"mlx-lm batch", "mlx-lm sequential"} & set(engines) else None
    pico = {
        name: LLMEngine(EngineConfig(model=model, max_num_seqs=max_num_seqs,
                                     enforce_eager=name.endswith("eager")), loaded)
        for name in engines if name.startswith("pico-vllm")
    }
    runners: dict[str, Callable[[Workload], tuple[float, int]]] = {
        "pico-vllm": lambda w: run_pico(pico["pico-vllm"], w),
        "pico-vllm eager": lambda w: run_pico(pico["pico-vllm eager"], w),
        "mlx-lm batch": lambda w: run_mlx_lm_batch(twin, w, max_num_seqs),
        "mlx-lm sequential": lambda w: run_mlx_lm_sequential(twin, w),
    }
    warmup = Workload("warmup", [(list(range(10, 42)), 8)] * 2)
    for name in engines:  # first calls JIT-compile MLX's kernels: not timed
        runners[name](warmup)

    results: list[Result] = []
    jobs = [(w, e) for w in workloads if w != "online" for e in engines]
    for workload_name, engine in tqdm(jobs, desc="bench", disable=not progress):
        workload = make_workload(workload_name, vocab, quick)
        if engine != "mlx-lm sequential":
            # An untimed run of the same requests first, as a server would have warmed up: it
            # traces the decode graphs the workload needs and grows MLX's buffer cache.
            runners[engine](workload)
            if engine.startswith("pico-vllm"):
                pico[engine].scheduler.block_manager.reset_prefix_cache()
        seconds, produced = runners[engine](workload)
        results.append(Result(workload_name, engine, seconds, workload.prompt_tokens, produced))
    if "online" in workloads and "pico-vllm" in pico:
        workload = make_workload("mixed", vocab, quick, seed=1)
        for rate in tqdm(rates, desc="online", disable=not progress):
            metrics = run_online(pico["pico-vllm"], workload, rate)
            results.append(Result("online", "pico-vllm", metrics.pop("seconds"),
                                  workload.prompt_tokens, workload.output_tokens, metrics))
    return results, facts


def format_table(results: list[Result], facts: dict) -> str:
    """One row per (workload, engine): tokens/s, ratios to the mlx-lm baselines, % of peak."""
    by_key = {(r.workload, r.engine): r for r in results}
    flops_per_token = 2 * facts["parameters"]
    lines = [f"{'workload':<14} {'engine':<18} {'tok/s':>8} {'vs batch':>9} {'vs seq':>7} "
             f"{'% peak':>7} {'seconds':>8}"]
    for r in results:
        if r.workload == "online":
            continue
        ratios = []
        for baseline in ("mlx-lm batch", "mlx-lm sequential"):
            base = by_key.get((r.workload, baseline))
            ratios.append(f"{r.tokens_per_second / base.tokens_per_second:.2f}x" if base else "-")
        # Every prompt and output token costs ~2 FLOPs per parameter: the work actually done.
        achieved = flops_per_token * (r.prompt_tokens + r.output_tokens) / r.seconds
        lines.append(f"{r.workload:<14} {r.engine:<18} {r.tokens_per_second:>8.1f} {ratios[0]:>9} "
                     f"{ratios[1]:>7} {100 * achieved / facts['peak_matmul_flops']:>6.1f}% "
                     f"{r.seconds:>8.2f}")
    online = [r for r in results if r.workload == "online"]
    if online:
        lines.append("")
        lines.append(f"{'online rate/s':<14} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} "
                     f"{'p99':>7} {'ITL p50':>8} {'p99':>7}  (seconds)")
        for r in online:
            m = r.extra
            lines.append(f"{m['rate']:<14.2f} {r.tokens_per_second:>8.1f} {m['ttft_p50']:>9.3f} "
                         f"{m['ttft_p99']:>7.3f} {m['tpot_p50']:>9.3f} {m['tpot_p99']:>7.3f} "
                         f"{m['itl_p50']:>8.3f} {m['itl_p99']:>7.3f}")
    return "\n".join(lines)


def save(results: list[Result], facts: dict, folder: Path) -> list[Path]:
    """``results.json`` and the plots; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    payload = {"machine": facts, "results": [asdict(r) | {"tokens_per_second": r.tokens_per_second}
                                             for r in results]}
    paths = [folder / "results.json"]
    paths[0].write_text(json.dumps(payload, indent=2))

    offline = [r for r in results if r.workload != "online"]
    if offline:
        workloads = list(dict.fromkeys(r.workload for r in offline))
        engines = list(dict.fromkeys(r.engine for r in offline))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(engines)
        for i, engine in enumerate(engines):
            values = [next((r.tokens_per_second for r in offline
                            if r.workload == w and r.engine == engine), 0) for w in workloads]
            ax.bar(np.arange(len(workloads)) + i * width, values, width, label=engine)
        ax.set_xticks(np.arange(len(workloads)) + width * (len(engines) - 1) / 2, workloads)
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"Throughput per engine and workload ({facts['model']})")
        ax.legend()
        fig.tight_layout()
        paths.append(folder / "throughput.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    online = [r for r in results if r.workload == "online"]
    if online:
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [r.extra["rate"] for r in online]
        for key, label in (("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"),
                           ("itl_p50", "ITL p50"), ("itl_p99", "ITL p99")):
            ax.plot(rates, [r.extra[key] for r in online], marker="o", label=label)
        ax.set_xlabel("request rate (requests / s)")
        ax.set_ylabel("latency (s)")
        ax.set_title("pico-vllm latency vs request rate")
        ax.legend()
        fig.tight_layout()
        paths.append(folder / "latency_vs_rate.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
