"""`pico-vllm bench` end to end on a tiny random model: every engine, the table, the JSON, the plots."""

from __future__ import annotations

import json

import pytest

from pico_vllm.bench import ENGINES
from pico_vllm.cli import main as cli_main


@pytest.mark.slow
def test_bench_runs_every_engine_on_the_same_requests(random_model, tmp_path, capsys):
    model = random_model("llama", head_dim=32, vocab_size=512)
    out = tmp_path / "results"
    code = cli_main(["bench", "--model", str(model), "--quick", "--workload", "mixed",
                     "--workload", "single", "--workload", "online", "--rates", "50",
                     "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for engine in ENGINES:
        assert engine in printed
    assert "TTFT p50" in printed and "results.json" in printed

    payload = json.loads((out / "results.json").read_text())
    assert payload["machine"]["peak_matmul_flops"] > 0
    results = payload["results"]
    for workload in ("mixed", "single"):
        rows = [r for r in results if r["workload"] == workload]
        assert sorted(r["engine"] for r in rows) == sorted(ENGINES)
        assert len({r["output_tokens"] for r in rows}) == 1  # every engine made the same tokens
        assert rows[0]["output_tokens"] > 0
        assert all(r["tokens_per_second"] > 0 for r in rows)
    online = [r for r in results if r["workload"] == "online"]
    assert len(online) == 1 and online[0]["extra"]["ttft_p50"] > 0
    assert (out / "throughput.png").stat().st_size > 0
    assert (out / "latency_vs_rate.png").stat().st_size > 0


def test_bench_rejects_bad_rates(capsys):
    assert cli_main(["bench", "--rates", "fast"]) == 2
    assert "--rates must be comma-separated numbers" in capsys.readouterr().err
