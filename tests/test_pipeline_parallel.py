"""Pipeline parallelism: 2 ranks on 127.0.0.1 (`mlx.launch --backend ring -n 2`), each holding a
slice of the layers and their KV pool, decode what one process decodes (tokens and logprobs;
our own model files and mlx-lm's code through the adapter);
the split balances parameter bytes, a step goes down the stages in micro-batches, a stage reads
only its own weights, and what is not split yet fails at start-up with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlx.utils import tree_flatten
from test_tensor_parallel import ENGINE, PROMPTS, launch, launch_worker

from pico_vllm import LLM, EngineConfig, SamplingParams
from pico_vllm.engine.llm_engine import LLMEngine
from pico_vllm.loader import load
from pico_vllm.pipeline import micro_batches, split_layers


class StubGroup:
    """What ``Model.pipeline`` asks of a group (its rank and size), without launching ranks."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def nbytes(module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


def test_layers_split_into_contiguous_stages_that_make_the_costliest_stage_cheapest():
    assert split_layers([1] * 8, 0, 2) == [range(0, 4), range(4, 8)]
    # The LM head counts on the last stage: it takes fewer layers.
    assert split_layers([1] * 8, 2, 2) == [range(0, 5), range(5, 8)]
    assert split_layers([1] * 7, 0, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    # One costly layer stands alone; between equally costly splits the most even wins.
    assert split_layers([1, 1, 6, 1, 1], 0, 3) == [range(0, 2), range(2, 3), range(3, 5)]
    assert split_layers([1, 1], 0, 2) == [range(0, 1), range(1, 2)]
    assert split_layers([3, 1, 1], 5, 1) == [range(0, 3)]


def test_more_stages_than_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="pipeline_parallel_size 3 is more than the model's 2 layers"):
        split_layers([1, 1], 0, 3)


@pytest.mark.parametrize("num_tokens,parts,expected", [
    ([8] * 4, 2, [[(0, 0, 8), (1, 0, 8)], [(2, 0, 8), (3, 0, 8)]]),
    ([8] * 3, 2, [[(0, 0, 8), (1, 0, 4)], [(1, 4, 4), (2, 0, 8)]]),  # the middle chunk cut in two
    ([1, 1, 1, 29], 2, [[(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 13)], [(3, 13, 16)]]),
    ([512], 2, [[(0, 0, 256)], [(0, 256, 256)]]),  # one long prompt fills the pipeline too
    ([100], 3, [[(0, 0, 33)], [(0, 33, 33)], [(0, 66, 34)]]),
    ([3], 2, [[(0, 0, 3)]]),  # no piece of one token (it would look like a decode): whole
    ([1, 1, 2, 2], 2, [[(0, 0, 1), (1, 0, 1), (2, 0, 2)], [(3, 0, 2)]]),
    ([4, 4, 4, 4], 1, [[(0, 0, 4), (1, 0, 4), (2, 0, 4), (3, 0, 4)]]),
    ([1] * 4, 2, [[(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1)]]),  # decodes only: whole, weights read once
])
def test_a_steps_tokens_split_into_micro_batches_of_about_equal_tokens(num_tokens, parts, expected):
    assert micro_batches(num_tokens, parts) == expected


@pytest.mark.parametrize("rank,layers,has_embed,has_head", [(0, range(0, 3), True, False),
                                                            (1, range(3, 5), False, True)])
def test_a_stage_keeps_only_its_layers_and_the_ends_it_needs(random_model, rank, layers, has_embed,
                                                             has_head):
    full = load(str(random_model("llama", head_dim=32, num_hidden_layers=5))).model
    model = load(str(random_model("llama", head_dim=32, num_hidden_layers=5))).model
    stage = model.pipeline(StubGroup(rank, 2))
    assert stage.layers == layers and model.stage is stage
    assert len(model.model.layers) == len(layers) == model.kv_spec.num_layers  # its own pool only
    assert [layer.self_attn.layer for layer in model.model.layers] == list(range(len(layers)))
    assert ("embed_tokens" in model.model) == has_embed
    assert ("lm_head" in model) == ("norm" in model.model) == has_head
    kept = sum(nbytes(full.model.layers[i]) for i in layers)
    kept += nbytes(full.model.embed_tokens) * has_embed
    kept += (nbytes(full.lm_head) + nbytes(full.model.norm)) * has_head
    assert nbytes(model) == kept


def test_a_tied_lm_head_keeps_the_embeddings_on_the_last_stage(random_model):
    model = load(str(random_model("llama", head_dim=32, num_hidden_layers=4, tie_word_embeddings=True))).model
    model.pipeline(StubGroup(1, 2))
    assert "embed_tokens" in model.model and "norm" in model.model


def test_a_stage_reads_only_its_own_weights(random_model):
    """The checkpoint is loaded lazily: the peak memory of loading a stage is that stage's bytes
    (in a fresh process: MLX's peak counts every thread's arrays, other tests' included)."""
    path = str(random_model("llama", head_dim=32, num_hidden_layers=4, intermediate_size=2048))
    script = f"""
import pico_vllm, mlx.core as mx
from mlx.utils import tree_flatten
from pico_vllm.loader import load
from test_pipeline_parallel import StubGroup, nbytes
model = load({path!r}, lazy=True).model
model.pipeline(StubGroup(1, 2))
mx.eval(model.parameters())
print(nbytes(model), mx.get_peak_memory(), nbytes(load({path!r}).model))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    stage, peak, full = map(int, result.stdout.split())
    assert stage < 0.6 * full
    assert peak <= 1.01 * stage


def test_what_pipeline_parallelism_does_not_split_yet_fails_before_the_launch(random_model):
    llama = str(random_model("llama", head_dim=32))
    with pytest.raises(ValueError, match=r"pipeline_parallel_size 2 needs 2 processes started by mlx.launch"):
        LLMEngine(EngineConfig(model=llama, num_blocks=8, pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="speculative decoding is not served with pipeline parallelism"):
        LLMEngine(EngineConfig(model=llama, num_blocks=8, pipeline_parallel_size=2,
                               speculative_config={"method": "ngram"}))
    with pytest.raises(ValueError, match="tensor_parallel_size and pipeline_parallel_size cannot both"):
        EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1, got 0"):
        EngineConfig(pipeline_parallel_size=0)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])  # our own file, and mlx-lm's through the adapter
def test_layers_of_different_windows_are_not_split_yet(random_model, arch):
    model = load(str(random_model(arch, head_dim=32))).model
    with pytest.raises(ValueError, match="does not split a model whose layers attend over different windows"):
        model.pipeline(StubGroup(0, 2))


def test_a_hybrid_models_recurrent_layers_are_not_split_yet(random_model):
    model = load(str(random_model("lfm2", head_dim=16, num_hidden_layers=4, intermediate_size=128))).model
    with pytest.raises(ValueError, match="mlx-lm's 'lfm2' keeps recurrent state in its linear layers, which "
                                         "pipeline parallelism does not split yet"):
        model.pipeline(StubGroup(0, 2))


@pytest.mark.parametrize("rank,kept", [(0, [0, 1, 2]), (1, [3, 4])])
def test_an_mlx_lm_stage_skips_the_other_stages_layers_and_keeps_their_indices(random_model, rank, kept):
    """mlx-lm's own loop runs unchanged: the layers list keeps its length; another stage's
    layers hold no weights, the first kept one receives (after stage 0), the last sends (before
    the last stage)."""
    from pico_vllm.models.mlx_lm_pipeline import ReceivingLayer, SendingLayer, SkippedLayer

    model = load(str(random_model("mixtral", head_dim=32, num_hidden_layers=5))).model
    full = nbytes(model)
    stage = model.pipeline(StubGroup(rank, 2))
    layers = model.model.layers
    assert list(stage.layers) == kept and len(layers) == 5 and model.kv_spec.num_layers == len(kept)
    assert [i for i, layer in enumerate(layers) if not isinstance(layer, SkippedLayer)] == kept
    assert isinstance(layers[kept[0]], ReceivingLayer) == (rank == 1)
    assert isinstance(layers[kept[-1]], SendingLayer) == (rank == 0)
    assert 0 < nbytes(model) < 0.8 * full


@pytest.mark.slow
def test_two_stages_decode_what_one_process_decodes_holding_half_the_layers(random_model, tmp_path):
    """A small pool (chunked prefills, preemption, prefix hits), graphs and async scheduling on:
    the tokens and logprobs of 8 greedy prompts equal one process's, on both ranks."""
    models = [random_model("llama", head_dim=32, num_hidden_layers=5),
              random_model("qwen2", head_dim=32, num_hidden_layers=7),
              random_model("qwen3", head_dim=32, num_hidden_layers=5, tie_word_embeddings=True)]
    specs = [{"model": str(m), "engine": ENGINE, "prompts": PROMPTS, "max_tokens": 20,
              "parallel": "pipeline", "logprobs": 2} for m in models]
    result = launch_worker(tmp_path, specs, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    for i, path in enumerate(models):
        single = LLM(str(path), **ENGINE)
        expected = single.generate(PROMPTS, params, use_tqdm=False)
        full = single.engine.model
        layers = [range(*rank[i]["layers"]) for rank in ranks]
        num_layers = len(full.model.layers)
        assert (layers[0].start, layers[0].stop, layers[1].stop) == (0, layers[1].start, num_layers)
        tied = "lm_head" not in full
        for r, (rank, own) in enumerate(zip(ranks, layers)):
            report = rank[i]
            # Exactly its layers, plus the embeddings on the first stage (and on the last when
            # they are the LM head), the final norm and the LM head on the last.
            held = sum(nbytes(full.model.layers[j]) for j in own)
            held += nbytes(full.model.embed_tokens) * (r == 0 or tied)
            held += (nbytes(full.model.norm) + (0 if tied else nbytes(full.lm_head))) * (r == 1)
            assert report["param_bytes"] == held
            assert report["tokens"] == [o.token_ids for o in expected], f"{path.name}: tokens differ"
            for logprobs, top, want in zip(report["logprobs"], report["top_logprobs"], expected):
                assert logprobs == pytest.approx(want.logprobs, abs=1e-4)
                assert [[t for t, _ in step] for step in top] == [[t for t, _ in step]
                                                                  for step in want.top_logprobs]
                assert [[v for _, v in step] for step in top] == [
                    pytest.approx([v for _, v in s], abs=1e-4) for s in want.top_logprobs]
            assert report["kv_layers"] == len(own) and report["preemptions"] > 0


@pytest.mark.slow
def test_mlx_lm_models_split_by_layers_through_the_adapter_decode_what_one_process_decodes(random_model,
                                                                                           tmp_path):
    """Mixtral's experts and Gemma (its backbone scales the embeddings, which a receiving stage
    ignores) run mlx-lm's own code on each stage: tokens equal one process's."""
    models = [random_model("mixtral", head_dim=32, num_hidden_layers=5),
              random_model("gemma", head_dim=32, num_hidden_layers=5)]
    specs = [{"model": str(m), "engine": ENGINE, "prompts": PROMPTS, "max_tokens": 16,
              "parallel": "pipeline"} for m in models]
    result = launch_worker(tmp_path, specs, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i, path in enumerate(models):
        single = LLM(str(path), **ENGINE)
        assert type(single.engine.model).__name__ == "MlxLmModel"
        expected = [o.token_ids for o in single.generate(PROMPTS, params, use_tqdm=False)]
        assert [rank[i]["layers"] for rank in ranks] == [[0, 3], [3, 5]]
        for rank in ranks:
            assert rank[i]["tokens"] == expected, f"{path.name}: tokens differ"
            assert rank[i]["kv_layers"] == rank[i]["layers"][1] - rank[i]["layers"][0]
            assert rank[i]["preemptions"] > 0 and rank[i]["param_bytes"] < nbytes(single.engine.model)


@pytest.mark.slow
def test_generate_under_mlx_launch_with_two_stages_prints_what_one_process_prints(random_model):
    model = str(random_model("llama", head_dim=32, num_hidden_layers=4))
    argv = ["generate", "--model", model, "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos",
            "--num-blocks", "32", "--temperature", "0", "--pipeline-parallel-size", "2"]
    expected = LLM(model, num_blocks=32).generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    result = launch(["-m", "pico_vllm.cli", *argv], timeout=180)
    assert "exited with code" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("Hello" + expected.text) == 1, result.stdout  # rank 0 alone prints


@pytest.mark.slow
def test_a_stage_whose_slice_leaves_no_room_for_a_pool_fails_every_rank_at_start_up(random_model, tmp_path):
    """Stage 0 holds 3 of 5 layers, stage 1 only 2: a budget that holds a 2-layer block but not
    a 3-layer one fails rank 0, and rank 1 stops with it instead of waiting in a collective."""
    model = random_model("llama", head_dim=32, num_hidden_layers=5)
    block = 2 * 2 * 8 * 32 * 4  # K and V, 2 KV heads, 8 tokens, head_dim 32, fp32: per layer
    engine = {k: v for k, v in ENGINE.items() if k != "num_blocks"} | {"kv_cache_bytes": 2 * block}
    spec = {"model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": 4,
            "parallel": "pipeline"}
    result = launch_worker(tmp_path, [spec], timeout=120)
    assert (f"rank 0 (layers 0-2): KV memory budget of {2 * block} bytes holds no block of this model "
            f"({3 * block} bytes)") in result.stderr, result.stderr[-4000:]
    assert result.returncode == 1 and not list(tmp_path.glob("out.rank*.json"))


@pytest.mark.slow
def test_bench_splits_the_pico_vllm_engine_over_two_stages_and_rank_0_reports(random_model, tmp_path):
    model = str(random_model("llama", head_dim=32, num_hidden_layers=4))
    argv = ["bench", "--model", model, "--quick", "--workload", "single", "--workload", "steps",
            "--pipeline-parallel-size", "2", "--output", str(tmp_path)]
    result = launch(["-m", "pico_vllm.cli", *argv], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("steps engine") == 1  # rank 0 alone prints
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["pipeline_parallel_size"] == 2 and saved["machine"]["rank"] == 0
    assert [(r["workload"], r["engine"]) for r in saved["results"]] == [("single", "pico-vllm"),
                                                                        ("steps", "pico-vllm")]


@pytest.mark.parametrize("argv,message", [
    (["--engine", "mlx-lm batch"], "--pipeline-parallel-size splits the pico-vllm engines of our own "
                                   "model files (pico-vllm, eager, no-cascade), not mlx-lm batch"),
    (["--workload", "online"], "--pipeline-parallel-size runs the offline workloads and steps, not online"),
    (["--pipeline-parallel-size", "0"], "--pipeline-parallel-size must be >= 1, got 0"),
])
def test_bench_refuses_what_it_cannot_split_before_loading(argv, message, capsys):
    from pico_vllm.cli import main as cli_main

    split = [] if "--pipeline-parallel-size" in argv else ["--pipeline-parallel-size", "2"]
    assert cli_main(["bench", *split, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_every_served_architecture_splits_exactly_or_is_refused_with_its_reason():
    """``pipeline_walk.py`` over every architecture the engine serves: none decodes differently
    on 2 stages, and every refusal is one of the reasons the README gives."""
    result = launch([str(Path(__file__).parent / "pipeline_walk.py")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if ": " in line]
    assert lines and not [line for line in lines if "MISMATCH" in line]
    reasons = ("keeps recurrent state in its linear layers", "attend over different windows",
               "return more than their hidden states", "does not keep one K/V cache per decoder layer")
    refused = [line for line in lines if ": refused: " in line]
    assert all(any(reason in line for reason in reasons) for line in refused), refused
    assert sum(": split" in line for line in lines) >= 50  # what the adapter and our files split
