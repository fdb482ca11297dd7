"""Llama (covers Llama 2/3, Mistral, SmolLM, TinyLlama) over a flat batch of tokens.

Parameter names match Hugging Face / mlx-lm checkpoints, so ``mlx_lm.utils.load_model`` loads
them (quantized mlx-community ones included) unchanged. Unlike mlx-lm's model, which runs a
``[batch, seq_len]`` rectangle, ours runs the engine's flat ``[T]`` tokens: each with its own
position, and attention told by ``AttentionMetadata`` where each token's context lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.rope_utils import initialize_rope

from pico_vllm.distributed import check_shardable
from pico_vllm.layers.attention import FULL, AttentionMetadata, attention
from pico_vllm.layers.kv_cache import KVCache, KVSpec
from pico_vllm.pipeline import PipelineStage, parameter_bytes, split_layers


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    num_key_value_heads: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        self.variant = FULL  # plain causal attention over the whole context
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * head_dim, args.hidden_size, bias=bias)
        self.rope = initialize_rope(
            head_dim, args.rope_theta, args.rope_traditional, args.rope_scaling,
            args.max_position_embeddings,
        )

    def normalize_qk(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        """Hook for architectures that normalize q/k per head (Qwen3); Llama does not."""
        return q, k

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        T = x.shape[0]
        q = self.q_proj(x).reshape(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(T, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        # Every token has its own position: rotate [T, H, 1, D] with one offset per row, q and k
        # heads together (one rotary call per layer instead of two).
        qk = mx.concatenate([q, k], axis=1)[:, :, None, :]
        qk = self.rope(qk, offset=positions)[:, :, 0, :]
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = attention(q, k, v, cache, self.layer, meta, self.scale, self.variant)
        return self.o_proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    attention_class = Attention

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = self.attention_class(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, positions, cache, meta) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), positions, cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, layer_class: type[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [layer_class(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hidden_size = args.hidden_size
        self.stage: PipelineStage | None = None  # this rank's layers, under pipeline parallelism

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids, positions, cache, meta) -> mx.array:
        """The final hidden states; on a pipeline stage before the last, what it sent on."""
        stage = self.stage
        if stage is None or stage.is_first:
            h = self.embed(input_ids)
        else:
            dtype = self.layers[0].input_layernorm.weight.dtype  # the model's compute dtype
            h = stage.receive((input_ids.shape[0], self.hidden_size), dtype)
        for layer in self.layers:
            h = layer(h, positions, cache, meta)
        if stage is not None and not stage.is_last:
            return stage.send(h)
        return self.norm(h)


class Model(nn.Module):
    """Causal LM over the engine's flat batch:
    ``model(input_ids[T], positions[T], cache, meta, logit_rows[R]) -> logits[R, V]``, the LM
    head applied only to the rows that sample (all of them when ``logit_rows`` is None)."""

    backbone_class = LlamaModel
    layer_class = DecoderLayer
    # Whether the file applies a checkpoint's sliding window (else a binding window is refused).
    implements_sliding_window = False
    supports_graphs = True  # decode steps can be captured with mx.compile
    state_spec = None  # no linear layers: nothing beside the KV pool (see layers/state_pool.py)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = self.backbone_class(args, self.layer_class)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        cache: KVCache,
        meta: AttentionMetadata,
        logit_rows: mx.array | None = None,
    ) -> mx.array:
        hidden = self.model(input_ids, positions, cache, meta)
        if self.stage is not None and not self.stage.is_last:
            return hidden  # sent to the next stage: the last one computes the logits
        return self.compute_logits(hidden if logit_rows is None else hidden[logit_rows])

    @property
    def stage(self) -> PipelineStage | None:
        return self.model.stage

    def pipeline(self, group: mx.distributed.Group) -> PipelineStage:
        """Keep only this rank's stage of the layers (``pipeline.split_layers``, balanced by
        parameter bytes, what a decode step reads, the LM head's counted on the last stage);
        their KV pool is all this rank holds. The embeddings stay on the first stage, the final
        norm and LM head on the last (a tied head keeps the embeddings there too); layers are
        renumbered from 0 for the pool. Lazily loaded weights stay unread: what was pruned is
        never read, what is kept is read once the engine knows its pool fits beside it."""
        if len(set(self.layer_windows)) > 1:
            raise ValueError("pipeline parallelism does not split a model whose layers attend over "
                             "different windows yet (every rank must keep the same layer groups)")
        backbone = self.model
        costs = [parameter_bytes(layer) for layer in backbone.layers]
        head = parameter_bytes(backbone.embed_tokens if self.args.tie_word_embeddings else self.lm_head)
        stage = PipelineStage(group, split_layers(costs, head, group.size())[group.rank()])
        last = stage.is_last
        backbone.layers = [backbone.layers[i] for i in stage.layers]
        for i, layer in enumerate(backbone.layers):
            layer.self_attn.layer = i
        if not stage.is_first and not (last and self.args.tie_word_embeddings):
            del backbone["embed_tokens"]
        if not last:
            del backbone["norm"]
            if not self.args.tie_word_embeddings:
                del self["lm_head"]
        backbone.stage = stage
        return stage

    def compute_logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop what HF checkpoints carry but the model derives (rotary tables, tied heads)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            weights.pop("lm_head.scales", None)
            weights.pop("lm_head.biases", None)
        return weights

    def shard(self, group: mx.distributed.Group) -> None:
        """Keep this rank's slice for tensor parallelism over ``group`` (Megatron's split, with
        MLX's sharded layers): q/k/v and gate/up by output features, o_proj and down by input
        features plus one ``all_sum`` each. Embeddings, norms and the LM head stay whole."""
        n, args = group.size(), self.args
        check_shardable(args.num_attention_heads, args.num_key_value_heads, args.intermediate_size, n)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.num_heads //= n
            attn.num_kv_heads //= n
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        mx.eval(self.parameters())

    @property
    def kv_spec(self) -> KVSpec:
        """What this model's KV pool must hold: layers, KV heads (this rank's, when sharded),
        head_dim, and the query heads beside them."""
        attn = self.model.layers[0].self_attn
        return KVSpec(len(self.model.layers), attn.num_kv_heads, self.args.head_dim, attn.num_heads,
                      self.layer_windows)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: the whole context)."""
        return tuple(layer.self_attn.variant.window for layer in self.model.layers)

