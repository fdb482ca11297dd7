"""Acceptance: the embedded SmolLM2-135M-Instruct (4-bit GGUF) through pico-vllm equals mlx-lm
greedy on the same weights, and a chat prompt decodes to readable text."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.utils import dequantize_model

from pico_vllm import LLM, SamplingParams
from pico_vllm.gguf import embedded_model_path, load_gguf

pytestmark = pytest.mark.slow  # loads the embedded model and mlx-lm's twin

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(num_blocks=256)


@pytest.fixture(scope="module")
def mlx_lm_model() -> nn.Module:
    """mlx-lm's own Llama on the same (un-permuted) GGUF weights, dequantized to fp32 like ours."""
    config, weights, _ = load_gguf(embedded_model_path())
    model = llama.Model(llama.ModelArgs.from_dict(config))
    quant = config["quantization"]
    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        class_predicate=lambda path, _: quant.get(path, True) if f"{path}.scales" in weights else False,
    )
    model.load_weights(list(model.sanitize(weights).items()))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def test_batched_greedy_equals_mlx_lm(llm, mlx_lm_model):
    tokenizer = llm.tokenizer
    ids = [tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, out in zip(ids, outs):
        expected = [
            int(t)
            for t, _ in generate_step(mx.array(prompt), mlx_lm_model, max_tokens=MAX_TOKENS)
        ]
        assert out.token_ids == expected, f"prompt {tokenizer.decode(prompt)!r}"


def test_chat_prompt_answers_readably(llm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    outs = llm.chat(question, SamplingParams(temperature=0, max_tokens=24))
    assert len(outs) == 1
    out = outs[0]
    two = llm.chat([question, question], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.text for o in two] == [out.text, out.text]  # a list of conversations, as vLLM takes
    assert "Paris" in out.text
    assert out.text.isprintable() or "\n" in out.text
    assert out.finish_reason in ("stop", "length")


def test_cli_streams_the_embedded_model_with_chat(capsys):
    from pico_vllm.cli import main

    code = main(["generate", "--chat", "--prompt", "What is the capital of France?",
                 "--max-tokens", "12", "--num-requests", "2"])
    captured = capsys.readouterr()
    assert code == 0
    assert "Paris" in captured.out
    assert "embedded SmolLM2-135M-Instruct" in captured.err and "2 request(s)" in captured.err
    assert "Time to first token" in captured.err


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=1, max_tokens=40, ignore_eos=True),
])
def test_text_is_the_decode_of_the_generated_ids(llm, params):
    """The first token keeps its leading space: prompt + text reads as one text, like vLLM's."""
    prompts = ["The capital of France is", "Héllo wörld, naïve café"]
    streamed = {}
    final = {}
    for out in llm.stream(prompts, params):
        streamed[out.request_id] = streamed.get(out.request_id, "") + out.delta_text
        if out.finished:
            final[out.request_id] = out
    for out in final.values():
        assert out.text == llm.tokenizer._tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert streamed[out.request_id] == out.text
    if params.temperature == 0:
        assert next(iter(final.values())).text.startswith(" Paris")


def test_stop_string_cuts_the_decoded_text(llm):
    prompt = "The capital of France is"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    stop = full.text[5:8]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.index(stop)]
