"""Our flat-batch models against mlx-lm's own forward pass: logits, not just argmax."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load
from model_factory import make_random_model

from pico_vllm.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from pico_vllm.models import load_model_dir

BS = 8


def metadata(positions: list[int], table: list[int], decode: bool) -> AttentionMetadata:
    pos = np.array(positions)
    blocks = np.array(table)[pos // BS]
    context = positions[-1] + 1
    tables = mx.array(np.array(table[: -(-context // BS)], np.int32))
    return AttentionMetadata(
        slot_blocks=mx.array(blocks.astype(np.int32)),
        slot_offsets=mx.array((pos % BS).astype(np.int32)),
        block_tables=tables[None] if decode else mx.zeros((0, 1), mx.int32),
        context_lens=mx.array([context], mx.int32) if decode else mx.zeros((0,), mx.int32),
        prefills=() if decode else (PrefillChunk(0, len(positions), context, tables),),
    )


@pytest.mark.parametrize("arch,head_dim,tied", [("llama", 64, False), ("llama", 32, True),
                                                 ("qwen2", 64, False), ("qwen3", 32, False)])
def test_prefill_chunks_and_decode_match_mlx_lm_logits(tmp_path, arch, head_dim, tied):
    path = make_random_model(tmp_path / arch, arch, head_dim=head_dim, tie_word_embeddings=tied)
    ours, _ = load_model_dir(path)
    theirs, _ = mlx_lm_load(str(path))
    prompt = np.random.default_rng(0).integers(3, 512, size=21).tolist()
    expected = theirs(mx.array(prompt)[None], cache=(cache := make_prompt_cache(theirs)))[0]

    pool = KVCache(ours.kv_spec, 16, BS, mx.float32)
    table = [9, 2, 14, 5]  # scattered blocks
    got = []
    for start, end in [(0, 13), (13, 20)]:  # a prompt in two chunks...
        span = list(range(start, end))
        hidden = ours(mx.array(prompt[start:end]), mx.array(span), pool, metadata(span, table, False))
        got.append(ours.compute_logits(hidden))
    hidden = ours(mx.array(prompt[20:]), mx.array([20]), pool, metadata([20], table, True))  # ...a decode
    got.append(ours.compute_logits(hidden))
    np.testing.assert_allclose(np.array(mx.concatenate(got)), np.array(expected), atol=2e-4, rtol=2e-4)

    token = int(mx.argmax(expected[-1]))
    expected_next = theirs(mx.array([[token]]), cache=cache)[0, -1]
    hidden = ours(mx.array([token]), mx.array([21]), pool, metadata([21], table, True))
    np.testing.assert_allclose(np.array(ours.compute_logits(hidden)[0]), np.array(expected_next),
                               atol=2e-4, rtol=2e-4)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from pico_vllm.models import get_model_classes

    with pytest.raises(ValueError, match="unsupported architecture 'mamba'; supported: llama, "
                                         "mistral, qwen2, qwen3"):
        get_model_classes({"model_type": "mamba"})


@pytest.mark.parametrize("extra,window", [
    ({"sliding_window": 64}, 64),  # Mistral 7B v0.1 style: the window is on
    ({"sliding_window": None}, None),
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}, 64),
    ({"layer_types": ["full_attention", "full_attention"], "sliding_window": 64}, None),
])
def test_a_binding_sliding_window_is_an_error_not_full_attention(tmp_path, extra, window):
    """Our files attend over the whole context: a checkpoint whose window could bind is refused
    (naming the window and the max_model_len that serves it exactly), never approximated."""
    import json

    from pico_vllm import LLM

    path = make_random_model(tmp_path / "windowed", "llama", head_dim=32)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | extra))
    if window is None:
        assert LLM(str(path), num_blocks=16).engine.config.max_model_len == 1024
        return
    with pytest.raises(ValueError, match=f"sliding window of {window} tokens.*--max-model-len {window}"):
        LLM(str(path), num_blocks=16)
    assert LLM(str(path), num_blocks=16, max_model_len=window).engine.config.max_model_len == window


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_windows_count_only_when_use_sliding_window_is_on(model_type):
    from pico_vllm.models import sliding_window

    # Qwen2.5 configs ship sliding_window 32768 with use_sliding_window false.
    config = {"model_type": model_type, "sliding_window": 32768, "use_sliding_window": False}
    assert sliding_window(config) is None
    assert sliding_window(config | {"use_sliding_window": True}) == 32768
