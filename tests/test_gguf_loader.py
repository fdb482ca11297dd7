"""GGUF loading (names, q/k un-permutation, quantization, tokenizer) and model resolution."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pico_vllm import gguf
from pico_vllm.gguf import embedded_model_path, load_gguf, unpermute_rows
from pico_vllm.loader import load


@pytest.fixture(scope="module")
def smollm():
    return load_gguf(embedded_model_path())


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (rotate_half halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads,head_dim", [(9, 64), (3, 64), (4, 8)])
def test_unpermute_inverts_llama_cpp(heads, head_dim):
    w = np.random.default_rng(0).standard_normal((heads * head_dim, 12)).astype(np.float32)
    back = unpermute_rows(mx.array(llama_cpp_permute(w, heads)), heads)
    assert np.array_equal(np.array(back), w)


def test_config_and_every_tensor_named(smollm):
    config, weights, _ = smollm
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert config["quantization"] == {"group_size": 32, "bits": 4,
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}
    layers = config["num_hidden_layers"]
    # 9 per-layer tensors, 7 of them quantized triplets; plus embedding triplet and final norm.
    assert len(weights) == layers * (7 * 3 + 2) + 3 + 1
    assert all(k.startswith("model.") for k in weights)


def test_tokenizer_round_trips_and_knows_its_specials(smollm):
    _, _, tok = smollm
    for text in ["Hello, world!", "digits 12345 split", "héllo wörld ✓ 日本", "  spaces\n\ttabs"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("<|im_start|>")) == 1
    assert tok.encode("123") == [tok.encode("1")[0], tok.encode("2")[0], tok.encode("3")[0]]
    assert tok.eos_token == "<|im_end|>" and 2 in tok.eos_token_ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_non_llama_gguf_is_rejected(monkeypatch, tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"")
    monkeypatch.setattr(gguf.mx, "load", lambda *a, **k: ({}, {"general.architecture": "falcon"}))
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'; supported: llama"):
        load_gguf(fake)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("name", ["./no/such/dir", "/abs/missing", "~/missing-model", "a/b/c"])
def test_missing_local_paths_never_reach_the_hub(name, monkeypatch):
    monkeypatch.setattr("pico_vllm.loader._download", lambda _: pytest.fail("asked the hub"))
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        load(name)


@pytest.mark.parametrize("name", ["gpt2", "org/model"])
def test_hub_ids_that_cannot_be_downloaded_say_so_in_one_line(name, monkeypatch):
    def offline(repo_id):
        raise ConnectionError(f"Cannot reach https://huggingface.co/{repo_id}\n(traceback...)")

    monkeypatch.setattr("pico_vllm.loader._download", offline)
    with pytest.raises(FileNotFoundError, match=rf"model '{name}' is not a local path and could not "
                                                r"be downloaded .*\(offline\?\): ConnectionError: "
                                                rf"Cannot reach https://huggingface.co/{name}$"):
        load(name)


def test_a_corrupt_gguf_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ValueError, match=r"model.gguf is not a readable GGUF file \("):
        load(str(bad))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(str(tmp_path))
