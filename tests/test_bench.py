"""`pico-vllm bench` end to end on a tiny random model: every engine, the table, the JSON, the plots."""

from __future__ import annotations

import json
import re

import pytest

from pico_vllm.bench import DEFAULT_ENGINES
from pico_vllm.cli import main as cli_main


@pytest.mark.slow
def test_bench_runs_every_engine_on_the_same_requests(random_model, tmp_path, capsys):
    model = random_model("llama", head_dim=32, vocab_size=512)
    out = tmp_path / "results"
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "mixed",
                     "--workload", "single", "--workload", "repetitive", "--workload", "online",
                     "--rates", "50", "--output", str(out),
                     "--speculative-config", '{"num_speculative_tokens": 3, "prompt_lookup_min": 1}'])
    assert code == 0
    printed = capsys.readouterr().out
    for engine in DEFAULT_ENGINES:
        assert engine in printed
    assert "pico-vllm mlx-lm" not in printed  # not in the default selection
    assert "TTFT p50" in printed and "results.json" in printed

    payload = json.loads((out / "results.json").read_text())
    assert payload["machine"]["peak_matmul_flops"] > 0
    results = payload["results"]
    for workload in ("mixed", "single", "repetitive"):
        rows = [r for r in results if r["workload"] == workload]
        assert sorted(r["engine"] for r in rows) == sorted(DEFAULT_ENGINES)
        assert len({r["output_tokens"] for r in rows}) == 1  # every engine made the same tokens
        assert rows[0]["output_tokens"] > 0
        assert all(r["tokens_per_second"] > 0 for r in rows)
    online = [r for r in results if r["workload"] == "online"]
    # Online arrivals run on each pico-vllm engine selected.
    assert sorted(r["engine"] for r in online) == ["pico-vllm", "pico-vllm eager", "pico-vllm spec"]
    # The ngram engine drafted (3 at most per run) and says how many drafts it kept.
    assert payload["machine"]["speculative_config"] == {"num_speculative_tokens": 3, "prompt_lookup_min": 1}
    ngram = next(r for r in results if r["workload"] == "repetitive" and r["engine"] == "pico-vllm spec")
    drafted, kept, runs = (ngram["extra"][k] for k in ("drafted", "kept", "verified_runs"))
    assert runs <= drafted <= 3 * runs and 0 <= kept <= drafted
    assert f"repetitive     pico-vllm spec     {kept}/{drafted} = " in printed
    assert all(r["extra"]["ttft_p50"] > 0 for r in online)
    assert (out / "throughput.png").stat().st_size > 0
    assert (out / "latency_vs_rate.png").stat().st_size > 0


def test_bench_rejects_bad_rates(capsys):
    assert cli_main(["bench", "--rates", "fast"]) == 2
    assert "--rates must be comma-separated numbers" in capsys.readouterr().err


def test_an_online_only_run_warms_up_and_measures_each_rate_from_a_cold_prefix_cache(
        random_model, tmp_path, capsys, monkeypatch):
    from pico_vllm import bench_engines

    seen = []  # per rate: (tokens the engine generated before it, prompt tokens it took from the cache)
    real_run_online = bench_engines.run_online

    def run_online(engine, workload, rate):
        before = (engine.stats.generated_tokens, engine.stats.cached_prompt_tokens)
        metrics = real_run_online(engine, workload, rate)
        seen.append((before[0], engine.stats.cached_prompt_tokens - before[1], workload.output_tokens))
        return metrics

    monkeypatch.setattr(bench_engines, "run_online", run_online)
    model = random_model("llama", head_dim=32, vocab_size=512)
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "online",
                     "--engine", "pico-vllm eager", "--rates", "50,50", "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith("pico-vllm eager")]
    assert len(rows) == 2 and "online engine" in out.out
    assert not any(line.startswith("workload ") for line in out.out.splitlines())  # no empty table
    assert "bench:" not in out.err  # and no empty progress bar for it
    (first_before, first_hits, output_tokens), (_, second_hits, _) = seen
    assert first_before >= output_tokens  # the same requests ran once untimed before the first rate
    assert first_hits == second_hits == 0  # the second rate did not reuse the first one's prefixes


def test_online_shared_sends_shared_prefix_requests_which_run_cascade_attention(
        random_model, tmp_path, capsys, monkeypatch):
    from pico_vllm import bench_engines

    engines = []
    real_run_online = bench_engines.run_online

    def run_online(engine, workload, rate):
        engines.append((engine, workload))
        return real_run_online(engine, workload, rate)

    monkeypatch.setattr(bench_engines, "run_online", run_online)
    model = random_model("llama", head_dim=32, vocab_size=512)
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "online-shared",
                     "--engine", "pico-vllm", "--rates", "50", "--output", str(tmp_path)])
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pico-vllm")]
    assert len(rows) == 1 and rows[0].endswith("online-shared")
    ((engine, workload),) = engines
    prefix = workload.requests[0][0][:128]  # quick shared-prefix: 128 shared tokens
    assert all(prompt[:128] == prefix for prompt, _ in workload.requests)
    assert engine.stats.cascade_steps > 0


def test_bench_rejects_an_online_run_without_a_pico_vllm_engine(capsys):
    assert cli_main(["bench", "--workload", "online", "--engine", "mlx-lm batch"]) == 2
    assert "the online workload runs on the pico-vllm engines only" in capsys.readouterr().err


@pytest.mark.slow
def test_the_steps_workload_times_our_model_file_against_mlx_lm_code_on_the_same_weights(
        random_model, tmp_path, capsys):
    """Decode at batch 1, 8 and 32 and a 512-token prefill, for our own file's engine and the adapter
    engine (mlx-lm's model class on the same arrays), with each one's ratio to our file."""
    model = random_model("llama", head_dim=32, vocab_size=512)
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "steps", "--engine",
                     "pico-vllm", "--engine", "pico-vllm mlx-lm", "--output", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    table = printed.split("steps engine")[1].splitlines()
    assert "decode b1 ms" in table[0] and "decode b32 ms" in table[0] and "prefill 512 ms" in table[0]
    assert table[1].startswith("pico-vllm ") and table[1].count("1.00x") == 4  # our file against itself
    assert table[2].startswith("pico-vllm mlx-lm") and len(re.findall(r"\d\.\d\dx", table[2])) == 4
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["engine"] for r in results] == ["pico-vllm", "pico-vllm mlx-lm"]
    for r in results:
        assert set(r["extra"]) == {"decode_b1", "decode_b8", "decode_b32", "prefill_512"}
        assert all(0 < low <= mid <= high for low, mid, high in r["extra"].values())


def test_bench_rejects_steps_without_a_pico_vllm_engine(capsys):
    assert cli_main(["bench", "--workload", "steps", "--engine", "mlx-lm batch"]) == 2
    assert "the steps workload runs on the pico-vllm engines only" in capsys.readouterr().err


@pytest.mark.slow
def test_the_structured_workload_times_constrained_rows_and_the_first_token(random_model, tmp_path, capsys):
    model = random_model("llama", head_dim=32, vocab_size=512)
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "structured", "--engine",
                     "pico-vllm", "--output", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out.split("structured engine")[1].splitlines()
    assert [line.split()[1] for line in table[1:4]] == ["0", "4", "8"] and "1.00x" in table[1]
    assert "new schema" in table[4] and "compiled schema" in table[4]
    extra = json.loads((tmp_path / "results.json").read_text())["results"][0]["extra"]
    assert all(0 < low <= mid <= high for low, mid, high in extra.values()) and len(extra) == 6


def test_mlx_lm_speculative_runs_mlx_lms_speculation_with_the_spec_engines_draft(random_model, tmp_path,
                                                                                 capsys):
    model = random_model("llama", head_dim=32, vocab_size=512)
    spec = json.dumps({"model": str(model), "num_speculative_tokens": 2})  # the model as its own draft
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "single", "--engine",
                     "pico-vllm spec", "--engine", "mlx-lm speculative", "--speculative-config", spec,
                     "--output", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["engine"], r["output_tokens"]) for r in results] == [("pico-vllm spec", 32),
                                                                    ("mlx-lm speculative", 32)]
    assert cli_main(["bench", "--engine", "mlx-lm speculative"]) == 2  # default ngram: no draft model
    assert "the mlx-lm speculative engine needs a draft model" in capsys.readouterr().err
