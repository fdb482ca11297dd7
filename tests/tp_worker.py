"""One rank of a tensor- or pipeline-parallel run, started by ``mlx.launch`` from
``test_tensor_parallel.py`` and ``test_pipeline_parallel.py``.

Usage: ``tp_worker.py SPEC_JSON OUT_PREFIX``. For each run in the spec (a model folder, engine
arguments, prompts, max_tokens, ``"parallel": "pipeline"`` or tensor by default, ``logprobs``) it
builds the engine with that parallel size = the number of ranks, decodes the prompts greedily,
and writes ``OUT_PREFIX.rank<R>.json``: per run, each prompt's tokens (and logprobs), the pool's
KV-head and layer counts, this rank's layers and parameter bytes, preemptions, kept drafts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from pico_vllm import EngineConfig, SamplingParams
from pico_vllm.engine.llm_engine import LLMEngine


def run(spec: dict, group: mx.distributed.Group) -> dict:
    engine_args = spec["engine"] | ({"seed": group.rank()} if spec.get("seed_by_rank") else {})
    size = {f"{spec.get('parallel', 'tensor')}_parallel_size": group.size()}
    engine = LLMEngine(EngineConfig(model=spec["model"], **size, **engine_args))
    # seed_by_rank: a planted fault, sampling at temperature 1 from a different seed on each rank.
    params = SamplingParams(temperature=1.0 if spec.get("seed_by_rank") else 0, max_tokens=spec["max_tokens"],
                            ignore_eos=True, logprobs=spec.get("logprobs"))
    ids = [engine.add_request(prompt, params) for prompt in spec["prompts"]]
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    stage = engine.stage
    return {
        "tokens": [finished[i].token_ids for i in ids],
        "logprobs": [finished[i].logprobs for i in ids],
        "top_logprobs": [finished[i].top_logprobs for i in ids],  # JSON: [id, logprob] pairs
        "kv_heads": engine.runner.cache.state[0].shape[0],
        "kv_layers": engine.model.kv_spec.num_layers,
        "layers": None if stage is None else [stage.layers.start, stage.layers.stop],
        "param_bytes": sum(p.nbytes for _, p in tree_flatten(engine.model.parameters())),
        "preemptions": engine.stats.preemptions,
        "accepted_draft_tokens": engine.stats.accepted_draft_tokens,
    }


if __name__ == "__main__":
    specs, out_prefix = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    group = mx.distributed.init()
    reports = [run(spec, group) for spec in specs]
    Path(f"{out_prefix}.rank{group.rank()}.json").write_text(json.dumps(reports))
