"""Any mlx-lm model on the paged engine: mlx-lm's own code runs, only its attention core is ours.

mlx-lm runs a ``[batch, seq_len]`` rectangle and keeps each layer's K/V in a per-request cache
object; the engine runs one flat batch of ``T`` tokens from many sequences over a paged pool.
Three seams join them, and nothing else of mlx-lm's model is touched:

1. **The flat batch as a batch of one-token rows.** The ``T`` tokens go in as ``[T, 1]``: each
   token is its own batch row. mlx-lm already supports one rotary offset per row (its
   ``BatchKVCache``), so every layer rotates each token by its own position, and norms, MLPs
   and MoE experts are per token anyway.
2. **A cache object per layer** (:class:`LayerView`), passed where mlx-lm passes its caches:
   ``offset`` is the tokens' positions, ``update_and_fetch`` writes the step's K/V into the pool
   in place, and ``make_mask`` hands back a :class:`PagedMask` that records the window the
   model asked for (mlx-lm's sliding-window layers ask through their masks).
3. **The attention core.** Each attention module gets a subclass whose ``__call__`` is the
   module's own, compiled against a globals dict in which ``scaled_dot_product_attention`` (the
   function every mlx-lm attention calls after its cache update) is :func:`paged_sdpa`: the
   layer's queries, scale, mask and sinks go to :func:`pico_vllm.layers.attention.attend` (the
   Metal kernel for decodes, the prefill path for chunks). No module global changes: other
   users of mlx-lm in the process are unaffected.

The model's backbone (the module holding ``layers``) gets a subclass too, which keeps only the
rows that sample, so the LM head (and whatever mlx-lm applies after it: softcapping, scales)
runs on those rows alone.

At load, one probe forward of one token (:func:`probe`) records what every layer does: the shape
of the K/V it writes, its query heads, its window and sinks. A layer that writes no K/V, attends
twice, passes a mask of its own, or keeps latent or chunked attention is an error at load that
names it: a model this adapter cannot run exactly is never served approximately.

A hybrid model's linear layers (recurrent state instead of K/V) get their state from the state
pool: a first probe (:func:`probe_states`) finds the module that runs each one's recurrence and
``mlx_lm_state.py`` regroups the flat batch into sequences for it.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_sdpa
from mlx_lm.models.cache import RotatingKVCache

from pico_vllm.layers.attention import AttentionMetadata, AttentionVariant, attend
from pico_vllm.layers.kv_cache import KVCache, KVSpec
from pico_vllm.layers.state_pool import StateSpec
from pico_vllm.models.mlx_lm_caches import CacheEntry, build_views, cache_layout, flat
from pico_vllm.models.mlx_lm_pipeline import (
    Outbox,
    check_splittable,
    hidden_dtype,
    layer_list,
    split_backbone,
)
from pico_vllm.models.mlx_lm_state import ProbeStateView, StateView, route_mixers
from pico_vllm.pipeline import PipelineStage

logger = logging.getLogger("pico_vllm.models")


class PagedMask(NamedTuple):
    """What a paged layer gets for ``mask``: only the sliding window the model asked for."""

    window: int | None


class LayerView:
    """Layer ``layer``'s cache during one paged forward (see the module docstring)."""

    def __init__(self, layer: int, positions: mx.array, pool: KVCache, meta: AttentionMetadata):
        self.layer, self.offset, self.pool, self.meta = layer, positions, pool, meta
        self.writes = self.attends = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write the step's K/V (``[T, Hkv, 1, D]``) into the pool; what mlx-lm gets back is only
        handed on to :func:`paged_sdpa`, which reads the pool instead."""
        self.pool.write(self.layer, keys[:, :, 0], values[:, :, 0], self.meta)
        self.writes += 1
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> PagedMask:
        return PagedMask(window_size)

    def attend(self, queries: mx.array, scale: float, mask: Any, sinks: mx.array | None) -> mx.array:
        """``queries[T, Hq, 1, D]`` over the pool -> ``[T, Hq, 1, D]``."""
        self.attends += 1
        variant = AttentionVariant(window=_window_of(mask, self.layer), sinks=sinks)
        out = attend(queries[:, :, 0], self.pool, self.layer, self.meta, scale, variant)
        return out[:, :, None]


class ProbeView:
    """Layer ``layer``'s cache during the load-time probe: records, computes nothing real."""

    def __init__(self, layer: int) -> None:
        self.layer, self.offset = layer, mx.array([0, 1])
        self.writes = self.attends = 0
        self.kv_shape: tuple[int, ...] | None = None
        self.num_q_heads = 0
        self.window: int | None = None
        self.has_sinks = False

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape != values.shape:
            raise ValueError(f"layer {self.layer} keeps keys {keys.shape} and values {values.shape} "
                             "of different shapes (latent attention?), which the paged pool does not hold")
        self.kv_shape = keys.shape
        self.writes += 1
        return keys, values

    make_mask = LayerView.make_mask

    def attend(self, queries: mx.array, scale: float, mask: Any, sinks: mx.array | None) -> mx.array:
        self.attends += 1
        self.num_q_heads = queries.shape[1]
        self.window = _window_of(mask, self.layer)
        self.has_sinks = sinks is not None
        return mx.zeros_like(queries)


class StepCaches(list):
    """The per-layer views of one forward, as mlx-lm's cache list, plus the rows that sample."""

    def __init__(self, views: list, logit_rows: mx.array | None) -> None:
        super().__init__(views)
        self.logit_rows = logit_rows


def paged_sdpa(queries, keys, values, cache, scale, mask=None, sinks=None) -> mx.array:
    """Stands in for mlx-lm's ``scaled_dot_product_attention`` inside a paged attention module:
    the engine's layer views attend over the pool; any other cache (mlx-lm's own generation)
    gets mlx-lm's function, so the module still behaves exactly as before outside the engine."""
    if isinstance(cache, (LayerView, ProbeView)):
        return cache.attend(queries, scale, mask, sinks)
    return mlx_lm_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _window_of(mask: Any, layer: int) -> int | None:
    if mask is None:
        return None
    if not isinstance(mask, PagedMask):
        raise ValueError(f"layer {layer} attends with a mask of its own ({type(mask).__name__}), "
                         "not one the cache made: the paged engine cannot tell what it hides")
    return mask.window


@functools.cache
def paged_attention_class(cls: type) -> type:
    """``cls`` with its own ``__call__``, but calling :func:`paged_sdpa` for the attention core."""
    call = cls.__call__
    routed = types.FunctionType(
        call.__code__, dict(call.__globals__, scaled_dot_product_attention=paged_sdpa),
        call.__name__, call.__defaults__, call.__closure__,
    )
    routed.__kwdefaults__ = call.__kwdefaults__
    return type(cls.__name__, (cls,), {"__call__": routed, "__module__": cls.__module__})


@functools.cache
def sampling_rows_class(cls: type) -> type:
    """``cls`` (a backbone) returning only the hidden rows that sample (``StepCaches.logit_rows``)."""

    def __call__(self, *args, **kwargs):
        hidden = cls.__call__(self, *args, **kwargs)
        caches = next((a for a in (*args, *kwargs.values()) if isinstance(a, StepCaches)), None)
        if caches is None or caches.logit_rows is None:
            return hidden
        return hidden[caches.logit_rows]

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


class LayerPlan(NamedTuple):
    """What the probe found one cache entry (an attention layer) of the model to be."""

    num_kv_heads: int
    head_dim: int
    num_q_heads: int
    window: int | None
    has_sinks: bool


class MlxLmModel(nn.Module):
    """An mlx-lm model behind the engine's model interface:
    ``model(input_ids[T], positions[T], cache, meta, logit_rows[R]) -> logits[R, V]``."""

    def __init__(self, model: nn.Module, model_type: str) -> None:
        super().__init__()
        self.model = model
        self.model_type = model_type
        self.layout, self._kv_kinds = cache_layout(model, model_type)
        _route(model, model_type, len(self._kv_kinds))
        self.state_spec = probe_states(model, model_type, self.layout)  # None: no linear layers
        self.plan, self.vocab_size = probe(model, model_type, self.layout, self._kv_kinds)
        self.supports_graphs = _traces_under_compile(model, self.layout)
        self.stage: PipelineStage | None = None  # this rank's layers, under pipeline parallelism
        self._outbox: Outbox | None = None  # what a stage before the last sends on

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        cache: KVCache,
        meta: AttentionMetadata,
        logit_rows: mx.array | None = None,
    ) -> mx.array:
        views, states = [], []
        stage = self.stage

        def kv_view(layer: int) -> LayerView:
            if stage is not None and layer not in stage.layers:
                return LayerView(-1, positions, cache, meta)  # another stage's: only asked for masks
            views.append(LayerView(layer - (stage.layers.start if stage else 0), positions, cache, meta))
            return views[-1]

        def state_view(entry: CacheEntry) -> StateView:
            states.append(StateView(entry.index, cache.states, meta))
            return states[-1]

        sends = stage is not None and not stage.is_last  # then the LM head runs on no rows
        caches = StepCaches(build_views(self.layout, kv_view, state_view),
                            mx.zeros((0,), mx.int32) if sends else logit_rows)
        logits = self.model(input_ids[:, None], cache=caches)
        for view in views:  # what the probe checked, kept true at every trace
            assert view.writes == 1 and view.attends == 1, (view.layer, view.writes, view.attends)
        for view in states:
            assert view.calls == 1, (view.layer, view.calls)
        return self._outbox.sent if sends else logits[:, 0]

    @property
    def kv_spec(self) -> KVSpec:
        first = self.plan[0]
        return KVSpec(len(self.plan), first.num_kv_heads, first.head_dim, first.num_q_heads,
                      self.layer_windows)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(layer.window for layer in self.plan)

    def shard(self, group: mx.distributed.Group) -> None:
        """mlx-lm's own tensor-parallel split, where the architecture has one."""
        if not hasattr(self.model, "shard"):
            raise ValueError(f"mlx-lm's {self.model_type!r} model has no shard(): it cannot be split "
                             "over ranks (tensor parallelism)")
        if self.state_spec is not None:
            raise ValueError(f"mlx-lm's {self.model_type!r} keeps recurrent state in its linear layers, "
                             "which tensor parallelism does not split yet: serve it on one rank")
        self.model.shard(group)
        mx.eval(self.model.parameters())
        self.plan, _ = probe(self.model, self.model_type, self.layout, self._kv_kinds)


    def pipeline(self, group: mx.distributed.Group) -> PipelineStage:
        """Keep only this rank's stage of mlx-lm's layers (``mlx_lm_pipeline.py``), balanced by
        parameter bytes; the pool holds those layers only. Refused, with the reason, for what
        a stage could not run exactly."""
        layers = layer_list(_backbone(self.model, self.model_type))
        check_splittable(self.model_type, self.layout, self.layer_windows, self.state_spec is not None,
                         len(layers))
        views = probe_views(self.layout)[0]
        dtype = hidden_dtype(layers, lambda: _probe_forward(self.model, self.model_type, views),
                             self.model_type)
        self.stage, self._outbox = split_backbone(layers, self.model, group, dtype)
        self.plan = tuple(self.plan[i] for i in self.stage.layers)
        return self.stage


def probe_views(layout: list) -> tuple[list, list[ProbeView], list[ProbeStateView]]:
    """Recording views for a probe forward: the cache list, and its attention and linear views."""
    kv, states = [], []

    def kv_view(layer: int) -> ProbeView:
        kv.append(ProbeView(layer))
        return kv[-1]

    def state_view(entry: CacheEntry) -> ProbeStateView:
        states.append(ProbeStateView(entry.index, entry.size))
        return states[-1]

    return build_views(layout, kv_view, state_view), kv, states


def probe_states(model: nn.Module, model_type: str, layout: list) -> StateSpec | None:
    """For a hybrid model: find each linear layer's mixer in one probe forward, route it
    (``mlx_lm_state.py``) and return the state a sequence needs; None for a model without."""
    if not any(e.kind == "state" for e in flat(layout)):
        return None
    views, _, states = probe_views(layout)
    _probe_forward(model, model_type, views)
    return route_mixers(model_type, states)


def _probe_forward(model: nn.Module, model_type: str, views: list) -> mx.array:
    """Two one-token rows through ``model`` with recording ``views`` (as a step has many rows:
    code that treats the positions as one number fails here); its logits."""
    try:
        return model(mx.zeros((2, 1), mx.int32), cache=StepCaches(views, None))
    except Exception as e:  # mlx-lm code that cannot take per-row positions, or a view refusing
        raise ValueError(f"mlx-lm's {model_type!r} model does not run on the paged engine's layer "
                         f"views: {type(e).__name__}: {e}") from e


def _route(model: nn.Module, model_type: str, num_layers: int) -> None:
    """Give the backbone its row-selecting subclass and every module whose own ``__call__``
    calls ``scaled_dot_product_attention`` its paged one: one per cache entry, or the model
    attends somewhere without K/V of its own (layers that share another layer's K/V)."""
    backbone = _backbone(model, model_type)
    attentions = [
        module for _, module in backbone.named_modules()
        if isinstance(call := type(module).__call__, types.FunctionType)
        and "scaled_dot_product_attention" in call.__code__.co_names
    ]
    if len(attentions) != num_layers:
        raise ValueError(f"mlx-lm's {model_type!r} has {len(attentions)} attention modules but "
                         f"{num_layers} K/V caches (layers that share another layer's K/V?); the "
                         "paged engine gives every attention layer its own")
    backbone.__class__ = sampling_rows_class(type(backbone))
    for module in attentions:
        module.__class__ = paged_attention_class(type(module))


def _backbone(model: nn.Module, model_type: str) -> nn.Module:
    """The module that holds the decoder layers as a list (``model.model.layers``,
    ``model.language_model.model.layers``, GPT-2's ``model.h``, ...): the first one found,
    breadth first."""
    stack = [model]
    while stack:
        module = stack.pop(0)
        children = module.children()
        if any(isinstance(c, list) and c and all(isinstance(m, nn.Module) for m in c)
               for c in children.values()):
            return module
        stack += [child for child in children.values() if isinstance(child, nn.Module)]
    raise ValueError(f"mlx-lm's {model_type!r} model has no module holding its decoder layers")


def _traces_under_compile(model: nn.Module, layout: list) -> bool:
    """Whether ``mx.compile`` can capture the forward: some mlx-lm models read arrays back to
    Python inside it (DBRX's experts: ``.tolist()``), which only runs eagerly."""

    def forward(tokens: mx.array) -> mx.array:
        return model(tokens, cache=StepCaches(probe_views(layout)[0], None))

    try:
        mx.compile(forward)(mx.zeros((2, 1), mx.int32))
    except ValueError as e:
        if "function transformations" not in str(e):
            raise
        logger.info("mlx-lm's %s reads arrays back inside its forward: decode steps run eagerly",
                    type(model).__module__)
        return False
    return True


def probe(model: nn.Module, model_type: str, layout: list, kinds: list) -> tuple[tuple[LayerPlan, ...], int]:
    """Run two one-token rows through ``model`` with recording views; return each attention
    layer's plan and the vocabulary (the logits' width), or raise naming the first layer the
    paged engine cannot run exactly. ``kinds``: mlx-lm's K/V cache of each attention layer."""
    cache, views, _ = probe_views(layout)
    logits = _probe_forward(model, model_type, cache)
    plans = []
    for view, kind in zip(views, kinds):
        where = f"mlx-lm's {model_type!r} layer {view.layer}"
        if (view.writes, view.attends) != (1, 1):
            raise ValueError(f"{where} wrote K/V {view.writes} and attended {view.attends} time(s) "
                             "in one forward; the paged engine runs layers that do each once, through "
                             "mlx-lm's scaled_dot_product_attention")
        window = kind.max_size if isinstance(kind, RotatingKVCache) else None
        if isinstance(kind, RotatingKVCache) and kind.keep:
            raise ValueError(f"{where} keeps its first {kind.keep} tokens beside a window, which "
                             "the paged engine does not implement")
        if view.window != window:
            raise ValueError(f"{where} attends with window {view.window} but caches for window "
                             f"{window}; mlx-lm itself would disagree with itself there")
        _, num_kv_heads, _, head_dim = view.kv_shape
        plans.append(LayerPlan(num_kv_heads, head_dim, view.num_q_heads, view.window, view.has_sinks))
    shapes = {(p.num_kv_heads, p.head_dim, p.num_q_heads) for p in plans}
    if len(shapes) > 1:
        raise ValueError(f"mlx-lm's {model_type!r} layers differ in K/V shape {sorted(shapes)}; "
                         "the paged pool holds one shape for every layer")
    return tuple(plans), logits.shape[-1]
