"""The incremental detokenizer: text == decode(ids), UTF-8 characters split across tokens, stops."""

from __future__ import annotations

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from pico_vllm.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(random_model):
    return load_tokenizer(random_model("llama", head_dim=32))


def byte_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def test_a_character_split_over_byte_tokens_appears_once_whole(tokenizer):
    ids = byte_ids(tokenizer, "é!")  # 3 byte-level tokens: 0xC3, 0xA9, '!'
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tokenizer, [], prompt_ids=byte_ids(tokenizer, "ab"))
    texts = []
    for token in ids:
        detok.add_token(token)
        texts.append(detok.text)
    assert texts == ["", "é", "é!"]


def test_text_equals_decode_of_the_ids_whatever_the_prompt(tokenizer):
    ids = byte_ids(tokenizer, " naïve café, ok")
    for prompt in ([], byte_ids(tokenizer, "x"), byte_ids(tokenizer, "a long prompt here")):
        detok = IncrementalDetokenizer(tokenizer, [], prompt)
        for token in ids:
            detok.add_token(token)
        detok.finalize()
        assert detok.text == tokenizer.decode(ids) == " naïve café, ok"


def test_stop_string_across_tokens_cuts_and_is_never_streamed(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, ["END"], [])
    streamed, stopped = "", False
    for token in byte_ids(tokenizer, "hello ENDING"):
        stopped = detok.add_token(token)
        streamed += detok.take_delta(finished=stopped)
        if stopped:
            break
    assert stopped and detok.text == streamed == "hello "
