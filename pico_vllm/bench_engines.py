"""How each engine of ``pico-vllm bench`` runs a workload, and the run itself (``benchmark``):
every engine warms up untimed on the same requests first, then is timed (see ``bench.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from pico_vllm.bench import (
    ONLINE,
    PICO_ONLY,
    SPECULATIVE_DEFAULT,
    STEP_KEYS,
    STRUCTURED_KEYS,
    Result,
    Workload,
    check_selection,
    make_workload,
    percentile,
)
from pico_vllm.config import EngineConfig, SpeculativeConfig
from pico_vllm.engine.llm_engine import LLMEngine
from pico_vllm.loader import LoadedModel, load
from pico_vllm.sampling_params import SamplingParams


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


def run_mlx_lm_speculative(model: nn.Module, draft: nn.Module, workload: Workload,
                           k: int) -> tuple[float, int]:
    """Seconds for mlx-lm's ``speculative_generate_step`` with ``draft`` proposing ``k`` tokens,
    one request after the other."""
    from mlx_lm.generate import speculative_generate_step

    started = time.perf_counter()
    produced = 0
    for prompt, n in workload.requests:
        steps = speculative_generate_step(mx.array(prompt), model, draft, num_draft_tokens=k, max_tokens=n)
        produced += sum(1 for _ in steps)
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


def run_steps(engines: dict[str, LLMEngine], vocab_size: int, repeats: int) -> dict[str, dict]:
    """Per engine: (min, median, max) seconds of a decode step at batch 1, 8 and 32 (64-token
    prompts, 32 steps timed after every sequence has its first token) and of a 512-token prefill
    (one request, one token), the engines taking turns ``repeats`` times so that drift on the
    machine touches them alike."""
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in STEP_KEYS} for name in engines}

    def decode_step(engine: LLMEngine, batch: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True)
        ids = {engine.add_request(rng.integers(10, vocab_size, 64).tolist(), params) for _ in range(batch)}
        started = set()
        while started != ids:  # the prefill and each first token, untimed
            started |= {out.request_id for out in engine.step()}
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return (time.perf_counter() - start) / 32

    def prefill(engine: LLMEngine) -> float:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        engine.add_request(rng.integers(10, vocab_size, 512).tolist(), params)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    for _ in range(repeats):
        for name, engine in engines.items():
            times[name]["decode_b1"].append(decode_step(engine, 1))
            times[name]["decode_b8"].append(decode_step(engine, 8))
            times[name]["decode_b32"].append(decode_step(engine, 32))
            times[name]["prefill_512"].append(prefill(engine))
            engine.reset_prefix_cache()
    return {name: {key: (min(v), float(np.median(v)), max(v)) for key, v in runs.items()}
            for name, runs in times.items()}


def run_structured(engine: LLMEngine, vocab_size: int, repeats: int) -> dict:
    """(min, median, max) seconds of a decode step at batch 8 with 0, 4 and 8 rows held to a
    grammar (a 400-character regex: none of them ends within the 32 steps timed), and of the
    first token of a request with no constraint, a schema never seen, and that schema again."""
    rng = np.random.default_rng(1)
    constraint = {"regex": "[a-z ]{400}"}
    times: dict[str, list[float]] = {key: [] for key in STRUCTURED_KEYS}

    def decode_step(constrained: int) -> float:
        ids = set()
        for i in range(8):
            params = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True,
                                    structured_outputs=constraint if i < constrained else None)
            ids.add(engine.add_request(rng.integers(10, vocab_size, 64).tolist(), params))
        started = set()
        while started != ids:
            started |= {out.request_id for out in engine.step()}
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return (time.perf_counter() - start) / 32

    def first_token(structured_outputs: dict | None) -> float:
        params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=structured_outputs)
        start = time.perf_counter()
        engine.add_request(rng.integers(10, vocab_size, 64).tolist(), params)
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    for repeat in range(repeats):
        for constrained in (0, 4, 8):
            times[f"constrained_{constrained}_of_8"].append(decode_step(constrained))
        schema = {"type": "object", "properties": {f"field{repeat}": {"type": "integer"}}}  # new each time
        times["first_token_free"].append(first_token(None))
        times["first_token_new_schema"].append(first_token({"json": schema}))
        times["first_token_compiled_schema"].append(first_token({"json": schema}))
        engine.reset_prefix_cache()
    return {key: (min(v), float(np.median(v)), max(v)) for key, v in times.items()}


def mlx_lm_twin(loaded: LoadedModel) -> nn.Module:
    """mlx-lm's own model class for the same config, holding the very same weight arrays (a
    model the adapter serves already is one: outside the engine it computes as mlx-lm's)."""
    import importlib

    from pico_vllm.models.mlx_lm_adapter import MlxLmModel

    if isinstance(loaded.model, MlxLmModel):
        return loaded.model.model
    module = importlib.import_module(f"mlx_lm.models.{loaded.config['model_type']}")
    twin = module.Model(module.ModelArgs.from_dict(loaded.config))
    twin.load_weights(tree_flatten(loaded.model.parameters()), strict=True)
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
    speculative_config: dict | None = None,
    pipeline_parallel_size: int = 1,
) -> tuple[list[Result], dict]:
    """Run ``workloads`` x ``engines``; returns the results and the machine facts. Every engine
    first runs each workload's requests once untimed (graphs traced, MLX's buffer cache grown),
    with the prefix cache reset before each timed run, online rates included. The spec engine
    runs ``speculative_config`` (default ``SPECULATIVE_DEFAULT``). With ``pipeline_parallel_size``
    above 1 every rank of ``mlx.launch`` runs this, each pico-vllm engine loading its own stage
    of the layers (facts' ``rank`` says which rank's results these are)."""
    check_selection(workloads, engines, speculative_config, pipeline_parallel_size)
    split = pipeline_parallel_size > 1
    loaded = load(model, lazy=split)  # split: read only for its sizes; each engine loads its stage
    rank = mx.distributed.init().rank() if split else 0
    progress = progress and rank == 0
    num_params = sum(p.size for _, p in tree_flatten(loaded.model.parameters()))
    vocab = loaded.model.vocab_size
    facts = {"model": loaded.name, "parameters": num_params,
             "peak_matmul_flops": peak_matmul_flops(loaded.config["hidden_size"]),
             "device": str(mx.default_device()), "quick": quick,
             "speculative_config": speculative_config or SPECULATIVE_DEFAULT,
             "pipeline_parallel_size": pipeline_parallel_size, "rank": rank}
    offline = [w for w in workloads if w not in PICO_ONLY]
    pico_names = [e for e in engines if e.startswith("pico-vllm")]
    used = [e for e in engines if offline or (e in pico_names and set(workloads) & set(PICO_ONLY))]
    twin = mlx_lm_twin(loaded) if any(e.startswith("mlx-lm") for e in used) else None
    pico = {name: LLMEngine(EngineConfig(
                model=model, max_num_seqs=max_num_seqs, enforce_eager=name.endswith("eager"),
                disable_cascade_attn=name.endswith("no-cascade"),
                speculative_config=facts["speculative_config"] if name.endswith("spec") else None,
                pipeline_parallel_size=pipeline_parallel_size,
            ), None if split else pico_model(name, loaded))
            for name in used if name.startswith("pico-vllm")}
    draft_twin, spec = None, SpeculativeConfig.from_dict(facts["speculative_config"])
    if "mlx-lm speculative" in used:  # the spec engine's draft, as mlx-lm's own model class
        draft_twin = mlx_lm_twin(load(spec.model))
    runners: dict[str, Callable[[Workload], tuple[float, int]]] = {
        name: (lambda w, e=engine: run_pico(e, w)) for name, engine in pico.items()
    } | {
        "mlx-lm batch": lambda w: run_mlx_lm_batch(twin, w, max_num_seqs),
        "mlx-lm sequential": lambda w: run_mlx_lm_sequential(twin, w),
        "mlx-lm speculative": lambda w: run_mlx_lm_speculative(twin, draft_twin, w,
                                                               spec.num_speculative_tokens),
    }
    warmup = Workload("warmup", [(list(range(10, 42)), 8)] * 2)
    for name in used:  # first calls JIT-compile MLX's kernels: not timed
        runners[name](warmup)

    results: list[Result] = []
    jobs = [(w, e) for w in offline for e in engines]
    for workload_name, engine in tqdm(jobs, desc="bench", disable=not progress or not jobs):
        workload = make_workload(workload_name, vocab, quick, tokenizer=loaded.tokenizer)
        if engine not in ("mlx-lm sequential", "mlx-lm speculative"):  # one request at a time: no warm-up
            # An untimed run of the same requests first, as a server would have warmed up: it
            # traces the decode graphs the workload needs and grows MLX's buffer cache.
            runners[engine](workload)
            if engine in pico:
                pico[engine].reset_prefix_cache()
        drafts_before = _draft_counts(pico.get(engine))
        seconds, produced = runners[engine](workload)
        drafted, kept, runs = np.subtract(_draft_counts(pico.get(engine)), drafts_before).tolist()
        extra = {"drafted": drafted, "kept": kept, "verified_runs": runs} if drafted else {}
        results.append(Result(workload_name, engine, seconds, workload.prompt_tokens, produced, extra))
    online = {name: make_workload(ONLINE[name], vocab, quick, seed=1) for name in ONLINE if name in workloads}
    online_jobs = [(name, e, rate) for name in online for e in pico_names for rate in rates]
    for workload in online.values():
        for engine in pico_names:
            runners[engine](workload)  # warm, as above: otherwise the first rate pays for it
    for name, engine, rate in tqdm(online_jobs, desc="online", disable=not progress or not online_jobs):
        workload = online[name]
        pico[engine].reset_prefix_cache()  # each rate computes its prompts; none reuses another's
        metrics = run_online(pico[engine], workload, rate)
        results.append(Result(name, engine, metrics.pop("seconds"),
                              workload.prompt_tokens, workload.output_tokens, metrics))
    if "structured" in workloads:
        for name in pico_names:
            extra = run_structured(pico[name], vocab, repeats=3 if quick else 7)
            results.append(Result("structured", name, 0.0, 0, 0, extra))
    if "steps" in workloads:
        steps = run_steps({name: pico[name] for name in pico_names}, vocab, repeats=3 if quick else 7)
        results += [Result("steps", name, 0.0, 0, 0, extra) for name, extra in steps.items()]
    return results, facts


def _draft_counts(engine: LLMEngine | None) -> tuple[int, int, int]:
    """Speculative decoding's running totals: drafted, kept, sequence-steps that drafted."""
    if engine is None:
        return 0, 0, 0
    return engine.stats.draft_tokens, engine.stats.accepted_draft_tokens, engine.stats.draft_runs


def pico_model(engine: str, loaded: LoadedModel) -> LoadedModel:
    """What a pico-vllm engine of the bench runs: the loaded model, or for ``pico-vllm mlx-lm``
    mlx-lm's own model class on the same weight arrays, behind the paged adapter."""
    from pico_vllm.models.mlx_lm_adapter import MlxLmModel

    if engine != "pico-vllm mlx-lm" or isinstance(loaded.model, MlxLmModel):
        return loaded
    from dataclasses import replace

    return replace(loaded, model=MlxLmModel(mlx_lm_twin(loaded), loaded.config["model_type"]))
