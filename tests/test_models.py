"""Our flat-batch models against mlx-lm's own forward pass: logits, not just argmax."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load
from model_factory import make_random_model

from pico_vllm.layers.attention import AttentionMetadata, PrefillChunk
from pico_vllm.layers.kv_cache import KVCache
from pico_vllm.models import load_model_dir

BS = 8


def metadata(positions: list[int], table: list[int], decode: bool) -> AttentionMetadata:
    pos = np.array(positions)
    blocks = np.array(table)[pos // BS]
    context = positions[-1] + 1
    tables = mx.array(np.array(table[: -(-context // BS)], np.int32))
    return AttentionMetadata(  # one layer group: every layer attends over the whole context
        slot_blocks=mx.array(blocks.astype(np.int32))[None],
        slot_offsets=mx.array((pos % BS).astype(np.int32)),
        block_tables=tables[None, None] if decode else mx.zeros((1, 0, 1), mx.int32),
        context_lens=mx.array([context], mx.int32) if decode else mx.zeros((0,), mx.int32),
        prefills=() if decode else (PrefillChunk(0, len(positions), context, tables[None]),),
    )


@pytest.mark.parametrize("impl", ["pico-vllm", "mlx-lm"])
@pytest.mark.parametrize("arch,head_dim,tied", [("llama", 64, False), ("llama", 32, True),
                                                 ("qwen2", 64, False), ("qwen3", 32, False)])
def test_prefill_chunks_and_decode_match_mlx_lm_logits(tmp_path, arch, head_dim, tied, impl):
    """Our own files and the mlx-lm adapter, on the same checkpoints: the same logits as mlx-lm."""
    path = make_random_model(tmp_path / arch, arch, head_dim=head_dim, tie_word_embeddings=tied)
    ours, _ = load_model_dir(path, model_impl=impl)
    theirs, _ = mlx_lm_load(str(path))
    prompt = np.random.default_rng(0).integers(3, 512, size=21).tolist()
    expected = theirs(mx.array(prompt)[None], cache=(cache := make_prompt_cache(theirs)))[0]

    pool = KVCache(ours.kv_spec, 16, BS, mx.float32)
    table = [9, 2, 14, 5]  # scattered blocks
    got = []
    for start, end in [(0, 13), (13, 20)]:  # a prompt in two chunks...
        span = list(range(start, end))
        got.append(ours(mx.array(prompt[start:end]), mx.array(span), pool, metadata(span, table, False)))
    got.append(ours(mx.array(prompt[20:]), mx.array([20]), pool, metadata([20], table, True)))  # ...a decode
    np.testing.assert_allclose(np.array(mx.concatenate(got)), np.array(expected), atol=2e-4, rtol=2e-4)

    token = int(mx.argmax(expected[-1]))
    expected_next = theirs(mx.array([[token]]), cache=cache)[0, -1]
    logits = ours(mx.array([token]), mx.array([21]), pool, metadata([21], table, True))
    np.testing.assert_allclose(np.array(logits[0]), np.array(expected_next), atol=2e-4, rtol=2e-4)
    # Only the rows asked for get logits (the rows that sample).
    span = list(range(21))
    rows = ours(mx.array(prompt[:21]), mx.array(span), pool, metadata(span, table, False), mx.array([4, 20]))
    np.testing.assert_allclose(np.array(rows), np.array(expected[mx.array([4, 20])]), atol=2e-4, rtol=2e-4)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from pico_vllm.models import get_model_classes

    with pytest.raises(ValueError, match="unsupported architecture 'mamba'; supported: llama, "
                                         "mistral, qwen2, qwen3, gemma2"):
        get_model_classes({"model_type": "mamba"})


@pytest.mark.parametrize("extra,window,served_by", [
    ({"sliding_window": 64}, 64, None),  # Mistral 7B v0.1 style: the window is on, nobody applies it
    ({"sliding_window": None}, None, "pico-vllm"),
    # mlx-lm's Llama applies windows that layer_types name: the adapter serves them.
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}, 64, "mlx-lm"),
    ({"layer_types": ["full_attention", "full_attention"], "sliding_window": 64}, None, "pico-vllm"),
])
def test_a_sliding_window_is_applied_or_refused_never_ignored(tmp_path, extra, window, served_by):
    """A checkpoint whose window could bind is served by model code that applies it, else refused
    (naming the window and the max_model_len that serves it exactly), never approximated."""
    import json

    from pico_vllm import LLM
    from pico_vllm.models.mlx_lm_adapter import MlxLmModel

    path = make_random_model(tmp_path / "windowed", "llama", head_dim=32)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | extra))
    if served_by is not None:
        engine = LLM(str(path), num_blocks=16).engine
        assert engine.config.max_model_len == 1024
        assert isinstance(engine.model, MlxLmModel) == (served_by == "mlx-lm")
        assert engine.model.layer_windows == ((64, None) if served_by == "mlx-lm" else (None, None))
        return
    with pytest.raises(ValueError, match=f"sliding window of {window} tokens.*--max-model-len {window}"):
        LLM(str(path), num_blocks=16)
    assert LLM(str(path), num_blocks=16, max_model_len=window).engine.config.max_model_len == window


def test_our_file_refuses_a_window_it_does_not_apply(tmp_path):
    import json

    from pico_vllm import LLM

    path = make_random_model(tmp_path / "windowed", "llama", head_dim=32)
    config = json.loads((path / "config.json").read_text())
    extra = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}
    (path / "config.json").write_text(json.dumps(config | extra))
    with pytest.raises(ValueError, match="sliding window of 64 tokens.*pico_vllm.models.llama"):
        LLM(str(path), num_blocks=16, model_impl="pico-vllm")


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_windows_count_only_when_use_sliding_window_is_on(model_type):
    from pico_vllm.models import sliding_window

    # Qwen2.5 configs ship sliding_window 32768 with use_sliding_window false.
    config = {"model_type": model_type, "sliding_window": 32768, "use_sliding_window": False}
    assert sliding_window(config) is None
    assert sliding_window(config | {"use_sliding_window": True}) == 32768
