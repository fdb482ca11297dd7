"""``pico-vllm bench``: named workloads, every engine on exactly the same requests, in one process.

Engines, each given the same random token-id prompts with ``ignore_eos`` (so each produces the
same number of tokens), on the same weights:

- ``pico-vllm``: this engine, decode steps through captured graphs;
- ``pico-vllm eager``: the same with ``enforce_eager=True``;
- ``pico-vllm spec``: the same with speculative decoding
  (``--speculative-config``, default ``SPECULATIVE_DEFAULT``);
- ``pico-vllm no-cascade``: the same with ``disable_cascade_attn=True`` (what cascade attention
  buys on ``shared-prefix``; not in the default selection);
- ``pico-vllm mlx-lm``: this engine running mlx-lm's model code through the paged adapter
  (``models/mlx_lm_adapter.py``) instead of our own model file: what every other architecture
  runs on (not in the default selection);
- ``mlx-lm batch``: mlx-lm's continuous-batching ``BatchGenerator``;
- ``mlx-lm sequential``: mlx-lm's ``generate_step``, one request after the other (naive serving);
- ``mlx-lm speculative``: mlx-lm's ``speculative_generate_step`` with the spec engine's draft model
  (``--speculative-config`` with a ``model``), one request after the other: the baseline of draft
  model speculation (not in the default selection).

Workloads: ``mixed`` (many requests, prompt and output lengths uniform in ranges: nano-vllm's
bench shape, scaled to a laptop), ``shared-prefix`` (requests sharing a long system prompt),
``single`` (one stream), ``repetitive`` (8 chat requests, 4 quick, to repeat a passage of Python code
taken from this package's own source: outputs that copy their input, where drafts pay; the
single-stream case is ``--max-num-seqs 1``), ``online`` (Poisson arrivals in real time through ``LLMEngine``,
reporting vLLM's ``bench serve`` metrics — TTFT, TPOT, ITL — over a sweep of rates; the
pico-vllm engines only), ``online-shared`` (the same with ``shared-prefix``'s requests: every
arrival shares a system prompt; not in the default selection), ``steps`` (a decode step at
batch 1, 8 and 32 and a 512-token prefill,
timed on each pico-vllm engine in turn, repeated: the model code's own speed) and
``structured`` (a decode step at batch 8 with 0, 4 and 8 rows held to a grammar, and the first
token's delay for a new schema, a compiled one and none); the last two are not in the default
selection. The table gives tokens/s, each engine's ratio to the two mlx-lm
baselines, and the fraction of this machine's peak matmul FLOP/s (measured in the same run) the
engine achieved.

This file holds what the sandbox *is* (workloads, results, the table and plots) and imports no
MLX, so ``pico-vllm bench --help`` stays fast; ``bench_engines.py`` runs the engines.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ENGINES = ("pico-vllm", "pico-vllm eager", "pico-vllm spec", "pico-vllm no-cascade", "pico-vllm mlx-lm",
           "mlx-lm batch", "mlx-lm sequential", "mlx-lm speculative")
WORKLOADS = ("mixed", "shared-prefix", "single", "repetitive", "online", "online-shared", "steps",
             "structured")
# What a bare `pico-vllm bench` (and `make run`) runs: the comparisons with mlx-lm.
DEFAULT_ENGINES = ("pico-vllm", "pico-vllm eager", "pico-vllm spec", "mlx-lm batch", "mlx-lm sequential")
DEFAULT_WORKLOADS = ("mixed", "shared-prefix", "single", "repetitive", "online")
SPECULATIVE_DEFAULT = {"method": "ngram", "num_speculative_tokens": 8}  # the spec engine's default
# The online workloads: the requests of an offline one, arriving at Poisson times.
ONLINE = {"online": "mixed", "online-shared": "shared-prefix"}
PICO_ONLY = (*ONLINE, "steps", "structured")  # workloads that run on the pico-vllm engines only


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
        return self.output_tokens / self.seconds if self.seconds else 0.0


def make_workload(name: str, vocab_size: int, quick: bool, seed: int = 0, tokenizer=None) -> Workload:
    """The named workload's requests: random token ids (from 10, clear of special tokens), or for
    ``repetitive`` chat prompts made with ``tokenizer`` (``repetitive_prompts``)."""
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
    if name == "repetitive":
        if tokenizer is None:
            raise ValueError("the repetitive workload needs the model's tokenizer")
        count, lines, output = (4, 12, 48) if quick else (8, 25, 128)
        prompts = repetitive_prompts(count, seed, lines)
        return Workload(name, [(_chat(tokenizer, text), output) for text in prompts])
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def repetitive_prompts(count: int, seed: int = 0, lines: int = 25) -> list[str]:
    """``count`` requests to repeat ``lines`` lines of Python code, each from another module of
    this package (its own source: shipped, offline, and code that an assistant gets to copy)."""
    sources = sorted(Path(__file__).parent.rglob("*.py"))
    rng = np.random.default_rng(seed)
    prompts = []
    for index in rng.choice(len(sources), size=count, replace=len(sources) < count):
        code = sources[index].read_text().splitlines()
        start = int(rng.integers(0, max(1, len(code) - lines)))
        passage = "\n".join(code[start : start + lines])
        prompts.append(f"Repeat this Python code exactly:\n\n```python\n{passage}\n```")
    return prompts


def _chat(tokenizer, text: str) -> list[int]:
    """``text`` as a user turn in the model's chat template (plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return list(tokenizer.encode(text))


def check_selection(workloads: list[str], engines: list[str], speculative_config: dict | None = None,
                    pipeline_parallel_size: int = 1) -> None:
    """ValueError for a selection that would measure nothing (before any model is loaded)."""
    if pipeline_parallel_size > 1:
        unsplit = [e for e in engines if not e.startswith("pico-vllm") or e in ("pico-vllm spec",
                                                                                 "pico-vllm mlx-lm")]
        if unsplit:
            raise ValueError(f"--pipeline-parallel-size splits the pico-vllm engines of our own model files "
                             f"(pico-vllm, eager, no-cascade), not {', '.join(unsplit)}: bench those in "
                             "one process, without it")
        timed = [w for w in workloads if w in ONLINE]
        if timed:  # each rank would admit arrivals by its own clock: their schedules would part
            raise ValueError(f"--pipeline-parallel-size runs the offline workloads and steps, not "
                             f"{', '.join(timed)} (arrivals in real time)")
    if "mlx-lm speculative" in engines and (speculative_config or {}).get("model") is None:
        raise ValueError("the mlx-lm speculative engine needs a draft model: --speculative-config "
                         "'{\"model\": \"<path or id>\", \"num_speculative_tokens\": 4}'")
    for name in PICO_ONLY:
        if name in workloads and not any(e.startswith("pico-vllm") for e in engines):
            raise ValueError(f"the {name} workload runs on the pico-vllm engines only: add "
                             "--engine pico-vllm (or 'pico-vllm eager', 'pico-vllm mlx-lm')")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation), 0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


def format_table(results: list[Result], facts: dict) -> str:
    """One row per (workload, engine): tokens/s, ratios to the mlx-lm baselines, % of peak; then
    one row per (engine, rate) of the online workload. A section without results is left out."""
    by_key = {(r.workload, r.engine): r for r in results}
    flops_per_token = 2 * facts["parameters"]
    lines = []
    offline = [r for r in results if r.workload not in PICO_ONLY]
    if offline:
        lines.append(f"{'workload':<14} {'engine':<20} {'tok/s':>8} {'vs batch':>9} {'vs seq':>7} "
                     f"{'% peak':>7} {'seconds':>8}")
    for r in offline:
        ratios = []
        for baseline in ("mlx-lm batch", "mlx-lm sequential"):
            base = by_key.get((r.workload, baseline))
            ratios.append(f"{r.tokens_per_second / base.tokens_per_second:.2f}x" if base else "-")
        # Every prompt and output token costs ~2 FLOPs per parameter: the work actually done.
        achieved = flops_per_token * (r.prompt_tokens + r.output_tokens) / r.seconds
        lines.append(f"{r.workload:<14} {r.engine:<20} {r.tokens_per_second:>8.1f} {ratios[0]:>9} "
                     f"{ratios[1]:>7} {100 * achieved / facts['peak_matmul_flops']:>6.1f}% "
                     f"{r.seconds:>8.2f}")
    drafting = [r for r in offline if r.extra.get("drafted")]
    if drafting:
        lines += ["", "speculative decoding (" + json.dumps(facts["speculative_config"]) + "): drafts kept"]
        for r in drafting:
            e = r.extra
            lines.append(f"{r.workload:<14} {r.engine:<18} {e['kept']}/{e['drafted']} = "
                         f"{e['kept'] / e['drafted']:.0%}, {e['kept'] / e['verified_runs']:.2f} per run")
    online = [r for r in results if r.workload in ONLINE]
    if online:
        lines += [""] if lines else []
        lines.append(f"{'online engine':<20} {'rate/s':>6} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} "
                     f"{'TPOT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7}  (seconds)  workload")
        for r in online:
            m = r.extra
            lines.append(f"{r.engine:<20} {m['rate']:>6.2f} {r.tokens_per_second:>8.1f} "
                         f"{m['ttft_p50']:>9.3f} {m['ttft_p99']:>7.3f} {m['tpot_p50']:>9.3f} "
                         f"{m['tpot_p99']:>7.3f} {m['itl_p50']:>8.3f} {m['itl_p99']:>7.3f}  {r.workload}")
    steps = [r for r in results if r.workload == "steps"]
    if steps:
        lines += [""] if lines else []
        lines.append(f"{'steps engine':<18} {'decode b1 ms':>12} {'decode b8 ms':>12} {'decode b32 ms':>13} "
                     f"{'prefill 512 ms':>14}"
                     "  (median of repeats [min-max]; ratio to pico-vllm)")
        base = next((r.extra for r in steps if r.engine == "pico-vllm"), None)
        for r in steps:
            cells = []
            for key in STEP_KEYS:
                low, mid, high = r.extra[key]
                ratio = f" {mid / base[key][1]:.2f}x" if base else ""
                cells.append(f"{mid * 1e3:.1f} [{low * 1e3:.1f}-{high * 1e3:.1f}]{ratio}")
            lines.append(f"{r.engine:<18} " + "  ".join(cells))
    structured = [r for r in results if r.workload == "structured"]
    if structured:
        lines += [""] if lines else []
        lines.append(f"{'structured engine':<18} {'rows held':>9} {'decode b8 ms':>22} {'vs free':>8}"
                     "  (median of repeats [min-max])")
        for r in structured:
            free = r.extra["constrained_0_of_8"][1]
            for key in STRUCTURED_KEYS[:3]:
                low, mid, high = r.extra[key]
                spread = f"{mid * 1e3:.1f} [{low * 1e3:.1f}-{high * 1e3:.1f}]"
                lines.append(f"{r.engine:<18} {key.split('_')[1] + ' of 8':>9} {spread:>22} "
                             f"{mid / free:>7.2f}x")
            first = ", ".join(f"{key.removeprefix('first_token_').replace('_', ' ')} "
                              f"{r.extra[key][1] * 1e3:.0f} ms" for key in STRUCTURED_KEYS[3:])
            lines.append(f"{r.engine:<18} first token: {first}")
    return "\n".join(lines)


STEP_KEYS = ("decode_b1", "decode_b8", "decode_b32", "prefill_512")
STRUCTURED_KEYS = ("constrained_0_of_8", "constrained_4_of_8", "constrained_8_of_8",
                   "first_token_free", "first_token_new_schema", "first_token_compiled_schema")


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

    offline = [r for r in results if r.workload not in PICO_ONLY]
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
    online = [r for r in results if r.workload in ONLINE]
    if online:
        fig, ax = plt.subplots(figsize=(6, 4))
        series = list(dict.fromkeys((r.engine, r.workload) for r in online))
        for engine, workload in series:
            rows = [r for r in online if (r.engine, r.workload) == (engine, workload)]
            for key, label in (("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"),
                               ("itl_p50", "ITL p50"), ("itl_p99", "ITL p99")):
                name = label if len(series) == 1 else f"{engine} {workload}: {label}"
                ax.plot([r.extra["rate"] for r in rows], [r.extra[key] for r in rows], marker="o",
                        label=name)
        ax.set_xlabel("request rate (requests / s)")
        ax.set_ylabel("latency (s)")
        ax.set_title("pico-vllm latency vs request rate")
        ax.legend()
        fig.tight_layout()
        paths.append(folder / "latency_vs_rate.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
