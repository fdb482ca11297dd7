"""`pico-vllm generate`: flags, validation before loading, output shape, timing, Ctrl-C, OpenBLAS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pico_vllm
from pico_vllm import cli
from pico_vllm.cli import build_parser, main, openblas_preload


@pytest.fixture(scope="module")
def model_dir(random_model):
    return str(random_model("llama", head_dim=32))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pico-vllm {pico_vllm.__version__}"
    assert pico_vllm.__version__[0].isdigit()


def test_every_flag_has_help_and_shows_its_default(capsys):
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--block-size", "16"), ("--max-tokens", "128"), ("--max-num-seqs", "64"),
                          ("--capture-graphs", "lazy")]:
        assert flag in text and f"(default: {default})" in text


@pytest.mark.parametrize("argv,error", [
    (["--max-tokens", "0"], "max_tokens must be >= 1, got 0"),
    (["--block-size", "12"], "invalid choice: 12"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--num-requests", "0"], "--num-requests must be >= 1"),
    (["--system", "be brief"], "--system needs --chat"),
    (["--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
])
def test_bad_arguments_fail_before_the_model_loads(monkeypatch, capsys, argv, error):
    monkeypatch.setattr("pico_vllm.llm.LLM.__init__", lambda *a, **k: pytest.fail("model loaded"))
    try:
        code = main(["generate", *argv])
    except SystemExit as e:  # argparse's own errors (choices)
        code = e.code
    assert code == 2
    assert error in capsys.readouterr().err


def test_generate_streams_text_ends_its_line_and_reports_timing(model_dir, capsys):
    code = main(["generate", "--model", model_dir, "--prompt", "Hi", "--max-tokens", "5",
                 "--num-requests", "3", "--num-blocks", "32", "--ignore-eos"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.startswith("Hi") and out.out.endswith("\n")
    for line in ("Prompt: 6 tokens", "3 request(s)", "Generation: 15 tokens", "tokens-per-sec",
                 "Time to first token:", "Peak memory:"):
        assert line in out.err


def test_a_request_that_cannot_fit_is_an_error_on_its_own_line_without_the_echo(model_dir, capsys):
    code = main(["generate", "--model", model_dir, "--prompt", "x" * 300, "--max-model-len", "64"])
    out = capsys.readouterr()
    assert code == 2
    assert out.out == ""  # nothing echoed before the error
    assert "\npico-vllm: error: prompt (300 tokens)" in "\n" + out.err


def test_prompt_from_a_file_and_from_stdin(model_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "prompt.txt"
    path.write_text("from a file")
    assert main(["generate", "--model", model_dir, "--prompt-file", str(path), "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("from a file")
    monkeypatch.setattr("sys.stdin", open(path))
    assert main(["generate", "--model", model_dir, "--prompt-file", "-", "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("from a file")


def test_ctrl_c_exits_130_quietly_keeping_the_output(model_dir):
    # Seconds of work (8 requests of 900 tokens) and one OpenBLAS thread: in a fresh-clone CI run
    # the single 1.5 s request once finished before the Ctrl-C got there (2 busy cores).
    process = subprocess.Popen(
        [sys.executable, "-m", "pico_vllm.cli", "generate", "--model", model_dir, "--prompt", "Hi",
         "--max-tokens", "900", "--ignore-eos", "--max-model-len", "1024", "--enforce-eager",
         "--num-requests", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, cli.NO_OPENBLAS_ENV: "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        assert process.stdout.read(2) == "Hi"  # generation has started
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "[pico-vllm] interrupted" in err
    assert out.endswith("\n") and len(out) > 0


@pytest.mark.parametrize("environ,platform,expected", [
    ({}, "linux", "LIB"),
    ({"LD_PRELOAD": "/x.so"}, "linux", "/x.so:LIB"),
    ({"LD_PRELOAD": "LIB"}, "linux", None),  # already loaded
    ({cli.NO_OPENBLAS_ENV: "1"}, "linux", None),  # opted out
    ({cli.REEXEC_ENV: "1"}, "linux", None),  # never loop
    ({}, "darwin", None),
])
def test_openblas_preload_decision(monkeypatch, environ, platform, expected):
    monkeypatch.setattr(cli, "OPENBLAS_PATHS", ("LIB",))
    monkeypatch.setattr(os.path, "exists", lambda p: p == "LIB")
    assert openblas_preload(environ, platform) == expected


@pytest.mark.skipif(not any(os.path.exists(p) for p in cli.OPENBLAS_PATHS), reason="no OpenBLAS")
def test_the_entry_point_reexecutes_itself_with_openblas():
    show = "import os; print(os.environ.get('LD_PRELOAD'))"
    code = ("import sys; from pico_vllm.cli import reexec_with_openblas; "
            f"reexec_with_openblas([sys.executable, '-c', {show!r}])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cli.REEXEC_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert "libopenblas" in out.stdout


def test_a_prompt_longer_than_one_step_shows_prefill_progress(model_dir, capsys):
    argv = ["generate", "--model", model_dir, "--max-tokens", "2", "--max-model-len", "256"]
    assert main([*argv, "--prompt", "x" * 100, "--max-num-batched-tokens", "16"]) == 0
    assert "prefill" in capsys.readouterr().err
    assert main([*argv, "--prompt", "x" * 10]) == 0
    assert "prefill" not in capsys.readouterr().err
