"""Gemma 2: Llama's skeleton with a sliding window on every other layer and softcapped scores.

What differs from Llama, each in one place below:

- **Attention** (:class:`Attention`): queries scaled by ``query_pre_attn_scalar ** -0.5``;
  scores softcapped, ``cap * tanh(s / cap)`` with ``attn_logit_softcapping``; the sliding
  layers (``layer_types``, or every even layer as in Hugging Face's Gemma 2) attend to their
  last ``sliding_window`` tokens. The variant goes to the shared ``attention`` (reference, prefill
  path and Metal kernel), so the engine around it is unchanged.
- **Norms**: RMSNorm scales by ``1 + weight``; four per layer (before and after attention and MLP).
- **MLP**: tanh-approximated GELU on the gate.
- **Embeddings** scaled by ``sqrt(hidden_size)``; the tied LM head's logits softcapped again
  with ``final_logit_softcapping``.

mlx-lm's own ``gemma2`` computes its softcapped scores inline (so the mlx-lm adapter cannot
route them to the pool) and attends over the whole context on every layer; up to the window
both are the same, and past it this file follows the checkpoint's window.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from pico_vllm.layers.attention import AttentionVariant
from pico_vllm.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tie_word_embeddings = True  # Gemma 2 has no LM head of its own (nor has mlx-lm's)

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return layer % 2 == 0


class RMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from 1."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.scale = args.query_pre_attn_scalar**-0.5
        window = args.sliding_window if args.is_sliding(layer) else None
        self.variant = AttentionVariant(window=window, softcap=args.attn_logit_softcapping)


class MLP(llama.MLP):
    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        norm = lambda: RMSNorm(args.hidden_size, eps=args.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, x, positions, cache, meta) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, cache, meta))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2Model(llama.LlamaModel):
    def __init__(self, args: ModelArgs, layer_class: type[DecoderLayer]) -> None:
        super().__init__(args, layer_class)
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.embed_scale = args.hidden_size**0.5

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.embed_tokens(input_ids) * self.embed_scale


class Model(llama.Model):
    backbone_class = Gemma2Model
    layer_class = DecoderLayer
    implements_sliding_window = True

    def compute_logits(self, hidden: mx.array) -> mx.array:
        logits = super().compute_logits(hidden)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap
