"""Qwen3: Llama with an RMSNorm over each head of q and k, before the rotary embedding."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from pico_vllm.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 1000000.0


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def normalize_qk(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        return self.q_norm(q), self.k_norm(k)


class DecoderLayer(llama.DecoderLayer):
    attention_class = Attention


class Model(llama.Model):
    layer_class = DecoderLayer
