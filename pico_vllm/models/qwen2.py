"""Qwen2 / Qwen2.5: Llama with a bias on the q, k and v projections (not on o)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from pico_vllm.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 1000000.0


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        dim, head_dim = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(dim, self.num_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * head_dim, bias=True)


class DecoderLayer(llama.DecoderLayer):
    attention_class = Attention


class Model(llama.Model):
    layer_class = DecoderLayer
