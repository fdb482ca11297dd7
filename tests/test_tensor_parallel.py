"""Tensor parallelism: 2 ranks on 127.0.0.1 (`mlx.launch --backend ring -n 2`) decode exactly what
one process decodes, each rank holding half the KV heads and half the sharded weights; bad
configurations fail at start-up on every rank, and nothing hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from pico_vllm import LLM, EngineConfig, SamplingParams
from pico_vllm.engine.llm_engine import LLMEngine

TESTS = Path(__file__).parent
# mlx.launch through `pico-vllm launch`, which exits with the first failed rank's code.
LAUNCH = (sys.executable, "-m", "pico_vllm.cli", "launch")
ENGINE = dict(num_blocks=24, block_size=8, max_num_batched_tokens=32, max_num_seqs=8)  # chunks, preemption
PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(12 + 5 * i)] for i in range(8)]


def launch(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n 2 python ARGS`` on this machine, comparing the sampled ids
    across ranks every step; the whole process group dies on a timeout."""
    command = [*LAUNCH, "--backend", "ring", "-n", "2", sys.executable, *args]
    env = {**os.environ, "PICO_VLLM_CHECK_TP": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def launch_worker(tmp_path: Path, specs: list[dict], timeout: int = 240) -> subprocess.CompletedProcess:
    """tp_worker.py on 2 ranks over ``specs``; each rank writes ``tmp_path/out.rank<R>.json``."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(specs))
    return launch([str(TESTS / "tp_worker.py"), str(spec_file), str(tmp_path / "out")], timeout)


def two_ranks_against_one_process(tmp_path: Path, models: list[Path], max_tokens: int, **ranks_engine):
    """Each model decoded greedily by 2 ranks (with ``ranks_engine`` options on top of ``ENGINE``)
    and by one process: yields, per model, the one-process LLM and both ranks' reports, after
    checking the ranks' tokens equal its own."""
    specs = [{"model": str(m), "engine": ENGINE | ranks_engine, "prompts": PROMPTS, "max_tokens": max_tokens}
             for m in models]
    result = launch_worker(tmp_path, specs)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, model in enumerate(models):
        single = LLM(str(model), **ENGINE)
        expected = [o.token_ids for o in single.generate(PROMPTS, params, use_tqdm=False)]
        for rank in ranks:
            assert rank[i]["tokens"] == expected, f"{model.name}: tokens differ from one process"
            assert rank[i]["kv_heads"] * 2 == single.engine.runner.cache.state[0].shape[0]
        yield single, [rank[i] for rank in ranks]


@pytest.mark.slow
def test_two_ranks_decode_what_one_process_decodes_with_half_the_heads_and_weights(random_model, tmp_path):
    models = [random_model("llama", head_dim=32, num_attention_heads=4, num_key_value_heads=2),
              random_model("qwen2", head_dim=32, num_attention_heads=8, num_key_value_heads=4),
              random_model("qwen3", head_dim=32, num_attention_heads=4, num_key_value_heads=2)]
    for single, reports in two_ranks_against_one_process(tmp_path, models, max_tokens=24):
        weights = dict(tree_flatten(single.engine.model.parameters()))
        replicated = sum(w.nbytes for name, w in weights.items() if "embed" in name or "lm_head" in name
                         or "norm" in name)
        sharded = sum(w.nbytes for w in weights.values()) - replicated
        for report in reports:
            assert report["preemptions"] > 0  # the small pool preempted, and recomputation agreed
            assert report["param_bytes"] == replicated + sharded // 2


@pytest.mark.slow
def test_two_ranks_verifying_drafts_decode_what_one_process_decodes_without(random_model, tmp_path):
    """Every rank drafts the same tokens from the same outputs and keeps the same ones."""
    model = random_model("llama", head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    speculative = {"method": "ngram", "prompt_lookup_min": 1}
    [(_, reports)] = two_ranks_against_one_process(tmp_path, [model], 24, speculative_config=speculative)
    assert reports[0]["accepted_draft_tokens"] == reports[1]["accepted_draft_tokens"] > 0


@pytest.mark.slow
def test_mlx_lm_models_split_with_their_own_shard_through_the_adapter(random_model, tmp_path):
    """Qwen3-MoE (experts split) and gpt-oss (sinks split by head, windowed layers in their own
    layer group) run mlx-lm's own Model.shard(); two ranks decode what one process decodes."""
    models = [random_model("qwen3_moe", head_dim=32, num_attention_heads=4, num_key_value_heads=2),
              random_model("gpt_oss", head_dim=32, num_attention_heads=4, num_key_value_heads=2)]
    served = list(two_ranks_against_one_process(tmp_path, models, max_tokens=16))
    assert [type(single.engine.model).__name__ for single, _ in served] == ["MlxLmModel"] * 2
    assert len(served[1][0].engine.runner.cache.layout.windows) == 2  # gpt-oss: two layer groups


def test_an_mlx_lm_model_without_a_shard_method_cannot_be_split(random_model):
    from pico_vllm.models import load_model_dir

    model, _ = load_model_dir(random_model("mixtral", head_dim=32))
    with pytest.raises(ValueError, match="mlx-lm's 'mixtral' model has no shard\\(\\): it cannot be split"):
        model.shard(None)


@pytest.mark.parametrize("heads,kv_heads,message", [
    (6, 3, "tensor_parallel_size 2 does not divide the model's num_key_value_heads (3)"),
    (4, 1, "tensor_parallel_size 2 is more than the model's num_key_value_heads (1)"),
])
@pytest.mark.slow
def test_a_model_that_does_not_split_fails_on_every_rank_at_start_up(random_model, tmp_path, heads, kv_heads,
                                                                    message):
    model = random_model("llama", head_dim=32, num_attention_heads=heads, num_key_value_heads=kv_heads)
    spec = {"model": str(model), "engine": ENGINE, "prompts": PROMPTS, "max_tokens": 4}
    result = launch_worker(tmp_path, [spec], timeout=120)  # returns: no rank is left waiting in a collective
    # Every rank checks before any communication, so each fails on its own; mlx.launch stops the
    # other rank once one has exited, sometimes before it printed, then exits 0: the wrapper 1.
    assert message in result.stderr, result.stderr[-4000:]
    assert "exited with code 1" in result.stderr and not list(tmp_path.glob("out.rank*.json"))
    assert result.returncode == 1


@pytest.mark.slow
def test_ranks_that_sample_differently_fail_loudly_in_check_mode(random_model, tmp_path):
    model = random_model("llama", head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    spec = {"model": str(model), "engine": ENGINE, "prompts": PROMPTS, "max_tokens": 8, "seed_by_rank": True}
    result = launch_worker(tmp_path, [spec], timeout=120)
    assert "tensor-parallel ranks sampled different tokens" in result.stderr, result.stderr[-4000:]


def test_tensor_parallel_without_a_launched_group_is_a_clear_error(random_model):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 needs 2 processes started by mlx.launch"):
        model = str(random_model("llama", head_dim=32))
        LLMEngine(EngineConfig(model=model, num_blocks=8, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        EngineConfig(tensor_parallel_size=0)


@pytest.mark.slow
def test_generate_under_mlx_launch_prints_once_what_one_process_prints(random_model):
    model = str(random_model("llama", head_dim=32, num_attention_heads=4, num_key_value_heads=2))
    argv = ["generate", "--model", model, "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos",
            "--num-blocks", "32", "--temperature", "0"]
    expected = LLM(model, num_blocks=32).generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    result = launch(["-m", "pico_vllm.cli", *argv, "--tensor-parallel-size", "2"], timeout=180)
    out, err = result.stdout, result.stderr
    assert "exited with code" not in err, err[-3000:]
    assert out.count("Hello" + expected.text) == 1, out  # rank 0 alone prints
    assert err.count("[pico-vllm] loaded") == 1, err[-3000:]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the ranks mlx.launch started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("split", ["--tensor-parallel-size", "--pipeline-parallel-size"])
@pytest.mark.slow
def test_serve_under_mlx_launch_answers_like_one_process_and_stops_cleanly(chat_model, split):
    import asyncio

    import httpx
    from server_load import PROMPTS as TEXTS
    from server_load import run_load
    from test_server_live import running_server, wait_until_idle

    flags = (split, "2", "--num-blocks", "64", "--max-model-len", "256")
    launcher = (*LAUNCH, "--backend", "ring", "-n", "2")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = {o.prompt: o.text for o in LLM(str(chat_model), num_blocks=64).generate(TEXTS, params,
                                                                                       use_tqdm=False)}
    with running_server(str(chat_model), *flags, launcher=launcher, env={"PICO_VLLM_CHECK_TP": "1"}) as (
            process, base):
        # 24 concurrent streams, every 4th hanging up after two chunks: rank 0 ships each
        # request and abort to rank 1 before the step that needs it.
        results, _ = asyncio.run(run_load(base, 24, leave_every=4, max_tokens=32))
        completed = [r for r in results if not r.leaves_early]
        assert all(r.status == 200 for r in results) and len(completed) == 18
        assert all(r.text == expected[r.prompt] and r.finish_reasons == ["length"] for r in completed)
        wait_until_idle(base)
        body = {"prompt": "Hello", "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 3}
        assert len(httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()["choices"]) == 3
        ranks = [rank for launcher in children(process.pid) for rank in children(launcher)]  # wrapped
        assert len(ranks) == 2
        for pid in ranks:  # what a Ctrl-C does: every rank gets the signal; rank 0 decides
            os.kill(pid, signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "exited with code" not in err and "Traceback" not in err, err


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_an_idle_two_rank_server_sleeps_instead_of_spinning(chat_model, tmp_path):
    """MLX's ring collectives busy-poll while they wait, so a follower parked in one spun a core
    (9.9 s of CPU per 10 s idle); it now waits on rank 0's doorbell. The ranks are started the
    way MLX documents without mlx.launch (MLX_RANK + MLX_HOSTFILE): mlx.launch 0.32's own I/O
    forwarding loop spins too, whatever the ranks do, and would hide theirs."""
    import time

    import httpx
    from test_server_live import free_port, wait_for_health

    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    port = free_port()
    command = [sys.executable, "-m", "pico_vllm.cli", "serve", "--model", str(chat_model),
               "--port", str(port), "--tensor-parallel-size", "2", "--num-blocks", "64",
               "--max-model-len", "256"]
    ranks = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                              start_new_session=True) for r in range(2)]
    try:
        wait_for_health(f"http://127.0.0.1:{port}", lambda: all(r.poll() is None for r in ranks),
                        lambda: "a rank exited before serving", timeout=120)
        body = {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30).status_code == 200
        time.sleep(1)
        before = [cpu_seconds(r.pid) for r in ranks]
        time.sleep(10)
        idle = [cpu_seconds(r.pid) - b for r, b in zip(ranks, before)]
        assert sum(idle) < 1.0, f"CPU seconds per rank over 10 s idle: {idle}"
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200  # and it still serves after the idle time
        for r in ranks:
            r.send_signal(signal.SIGTERM)
        for r in ranks:
            _, err = r.communicate(timeout=60)
            assert r.returncode == 0 and "Traceback" not in err, err
    finally:
        for r in ranks:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)


@pytest.mark.parametrize("failing_rank_code,expected", [(3, 3), (0, 0)])
def test_pico_vllm_launch_exits_with_the_first_failed_ranks_code(tmp_path, failing_rank_code, expected):
    """mlx.launch exits 0 when a rank fails; `pico-vllm launch` exits with that rank's code."""
    script = tmp_path / "ranks.py"
    script.write_text("import sys\nimport mlx.core as mx\n"
                      f"sys.exit({failing_rank_code} if mx.distributed.init().rank() == 1 else 0)\n")
    result = launch([str(script)], timeout=120)
    assert result.returncode == expected, result.stderr
    assert ("[pico-vllm] rank 1 failed: exiting 3" in result.stderr) == (expected == 3)
