"""Random-weight models of real architectures, saved as Hugging Face folders: the fast fixtures.

They are built with mlx-lm's own model classes (so mlx-lm, the oracle, loads them natively) and
given *peaked* logits, so that greedy decoding is decided by clear margins, not fp32 near-ties.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

OWN_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
EOS_TOKEN_ID = 257  # "</s>" in the tiny tokenizer below

# What each mlx-lm architecture of the acceptance list needs beyond the common tiny fields:
# every variant the adapter must carry (windows shorter than the test prompts, sinks, MoE,
# packed q|k|v, norms over whole projections, q/k norms).
ARCHITECTURE_EXTRAS: dict[str, dict] = {
    "gemma3_text": {"sliding_window": 24, "sliding_window_pattern": 2, "query_pre_attn_scalar": 48,
                    "rope_local_base_freq": 10000.0, "tie_word_embeddings": True},
    "gpt_oss": {"sliding_window": 24, "num_local_experts": 4, "num_experts_per_tok": 2,
                "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "moe_intermediate_size": 64, "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phi3": {"partial_rotary_factor": 0.5},
    "olmo2": {},
    "gemma2": {"sliding_window": 24, "query_pre_attn_scalar": 48, "attn_logit_softcapping": 20.0,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True},
}
# Hybrids (issue 19): linear layers with recurrent state beside attention layers, at head_dim 16
# (hidden size 64) and four layers. Attention every second layer where the config says so.
LINEAR_ATTENTION = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2}
HYBRID_EXTRAS: dict[str, dict] = {
    "qwen3_next": {**LINEAR_ATTENTION, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                   "shared_expert_intermediate_size": 32, "mlp_only_layers": [], "moe_intermediate_size": 32,
                   "partial_rotary_factor": 0.5},
    "qwen3_5": {**LINEAR_ATTENTION, "rope_parameters": {"type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5}},
    "lfm2": {"norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": 64,
             "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False,
             "block_ff_dim": 128,
             "layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "falcon_h1": {"mamba_d_conv": 4, "mamba_d_head": 16, "mamba_d_ssm": 64, "mamba_d_state": 16,
                  "mamba_n_heads": 4, "mamba_n_groups": 1, "mamba_chunk_size": 8},
    "nemotron_h": {"attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 16,
                   "mamba_proj_bias": False, "ssm_state_size": 16, "conv_kernel": 4, "n_groups": 1,
                   "mlp_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True,
                   "hybrid_override_pattern": ["M", "*", "-", "M"]},
    "granitemoehybrid": {"attention_bias": False, "embedding_multiplier": 1.0, "attention_multiplier": 0.25,
                         "logits_scaling": 1.0, "residual_multiplier": 1.0,
                         "layer_types": ["mamba", "attention", "mamba", "attention"], "mamba_n_heads": 8,
                         "mamba_d_head": 16, "mamba_proj_bias": False, "mamba_d_state": 16, "mamba_d_conv": 4,
                         "mamba_n_groups": 1, "mamba_conv_bias": True},
}
ARCHITECTURE_EXTRAS |= HYBRID_EXTRAS
# LFM2 ties its LM head to the embeddings, which peaked logits scale up, and its short
# convolution multiplies three small projections: its layers' outputs vanish beside a token's own
# embedding and it echoes its input token forever. Scaled, its layers decide the next token.
WEIGHT_SCALES: dict[str, dict[str, float]] = {
    "lfm2": {"in_proj.weight": 4.0, "out_proj.weight": 4.0, "w1.weight": 4.0, "w3.weight": 4.0},
}


def make_random_model(
    directory: Path,
    arch: str = "llama",
    *,
    head_dim: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    num_hidden_layers: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    logit_scale: float = 8.0,
    seed: int = 0,
    **extra,
) -> Path:
    """Save a random ``arch`` model (any mlx-lm architecture; ``ARCHITECTURE_EXTRAS`` and
    ``extra`` add its own fields) with a byte-level tokenizer under ``directory``; returns
    ``directory``. Qwen2 and Phi-3 derive head_dim from hidden_size, so the hidden size is
    always ``num_attention_heads * head_dim``."""
    config = {
        "model_type": arch,
        "hidden_size": num_attention_heads * head_dim,
        "num_hidden_layers": num_hidden_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 256,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": "float32",
        **ARCHITECTURE_EXTRAS.get(arch, {}),
        **extra,
    }
    if arch in OWN_ARCHITECTURES:
        config["architectures"] = [OWN_ARCHITECTURES[arch]]
    return save_random_model(directory, config, logit_scale=logit_scale, seed=seed)


def save_random_model(
    directory: Path, config: dict, *, logit_scale: float = 8.0, seed: int = 0, max_parameters: int = 10**7
) -> Path:
    """Build mlx-lm's model for exactly ``config`` with random weights, scale its output projection
    by ``logit_scale`` (peaked logits: top-1 margins dwarf fp32 rounding) and the weights
    ``WEIGHT_SCALES`` names, and save it with the tiny tokenizer under ``directory``. A config
    that still makes a big model is refused before anything is computed (MLX arrays are lazy
    until saved)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    size = sum(p.size for p in params.values())
    if size > max_parameters:
        raise ValueError(f"this config still makes {size:,} parameters")
    head = [k for k in params if k.endswith("lm_head.weight")] or [
        k for k in params if k.endswith("embed_tokens.weight")]
    for name in head:
        params[name] = params[name] * logit_scale
    for suffix, factor in WEIGHT_SCALES.get(config["model_type"], {}).items():
        for name in [k for k in params if k.endswith(suffix)]:
            params[name] = params[name] * factor
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), params)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_tiny_tokenizer(directory, config.get("vocab_size", 512))
    return directory


def write_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer: 256 byte tokens, ``<s>``/``</s>``, and filler tokens up to
    ``vocab_size`` so that every id a random model emits decodes to something."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    letters = "abcdefghijklmnopqrstuvwxyz"
    fillers = (a + b for a in letters for b in letters)
    for token_id in range(258, vocab_size):
        vocab[next(fillers)] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>")])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
    }))
