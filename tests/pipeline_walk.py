"""Every architecture the engine serves (``architectures.json``), split over the ranks of a launch
by layers: does it decode what one process decodes, or is it refused, and why?

    uv run pico-vllm launch --backend ring -n 2 .venv/bin/python tests/pipeline_walk.py [ARCH ...]

Each rank builds the same tiny random models (``architectures.tiny_config``, seeded), runs 3
greedy prompts (one longer than any window) through a pipeline-parallel engine, and rank 0
runs them again in one process and prints, per architecture, ``split`` (same tokens),
``MISMATCH`` or ``refused: <reason>``, then the counts (one launch for all: ~45 s on 2 cores;
``test_pipeline_parallel.py`` runs it).
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from architectures import load_records, tiny_config
from model_factory import save_random_model
from test_engine_parity import prompts_for

from pico_vllm import EngineConfig, LLMEngine, SamplingParams

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=24, num_blocks=64)


def decode(path: Path, pipeline_parallel_size: int) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(path), pipeline_parallel_size=pipeline_parallel_size, **ENGINE))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts_for(512, [3, 25, 48], seed=0)]
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    return [final[i] for i in ids]


def main() -> None:
    group = mx.distributed.init()
    archs = sys.argv[1:] or [name for name, r in load_records().items() if r.status == "served"]
    outcomes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as root:
        for arch in archs:
            path = save_random_model(Path(root) / arch, tiny_config(arch))
            try:
                tokens = decode(path, group.size())
            except ValueError as e:  # refused at start-up, on every rank alike
                outcomes[arch] = "refused: " + str(e).splitlines()[0]
            else:
                outcomes[arch] = "split" if group.rank() or tokens == decode(path, 1) else "MISMATCH"
            if group.rank() == 0:
                print(f"{arch}: {outcomes[arch]}", flush=True)
    if group.rank() == 0:
        counts = collections.Counter(outcome.split(":")[0] for outcome in outcomes.values())
        print(", ".join(f"{n} {kind}" for kind, n in counts.most_common()))


if __name__ == "__main__":
    main()
