"""mlx-lm's per-layer caches as the paged engine holds them: which of a model's cache entries are
an attention layer's K/V (the KV pool) and which a linear layer's recurrent state (the state
pool), and the cache list of views a paged forward hands the model in their place."""

from __future__ import annotations

from typing import NamedTuple

import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache, make_prompt_cache
from mlx_lm.models.cache import KVCache as MlxLmKVCache


class CacheEntry(NamedTuple):
    """One of mlx-lm's per-layer caches, as the engine holds it: an attention layer's K/V (in the
    KV pool) or a linear layer's ``size`` state arrays (in the state pool); ``index`` counts
    layers of its kind. A ``CacheList`` (Falcon-H1: both in one layer) is a list of entries."""

    kind: str  # "kv" | "state"
    index: int
    size: int = 0


def cache_layout(model: nn.Module, model_type: str) -> tuple[list, list]:
    """mlx-lm's caches for ``model`` as :class:`CacheEntry` s, and its K/V caches (one per attention
    layer); ValueError for any other kind (latent attention, chunked attention)."""
    kinds: list = []
    num_states = 0

    def entry(cache, layer: int):
        nonlocal num_states
        if isinstance(cache, (MlxLmKVCache, RotatingKVCache)):
            kinds.append(cache)
            return CacheEntry("kv", len(kinds) - 1)
        if type(cache) is ArraysCache:
            num_states += 1
            return CacheEntry("state", num_states - 1, len(cache.cache))
        if type(cache) is CacheList:
            return [entry(c, layer) for c in cache.caches]
        raise ValueError(f"mlx-lm's {model_type!r} layer {layer} keeps a {type(cache).__name__}, "
                         "not K/V or a recurrent state (latent or chunked attention), which the "
                         "paged engine does not hold yet")

    layout = [entry(cache, layer) for layer, cache in enumerate(make_prompt_cache(model))]
    if not kinds:
        raise ValueError(f"mlx-lm's {model_type!r} has no attention layer (a purely recurrent "
                         "model), which the paged engine does not serve yet")
    return layout, kinds


def build_views(layout: list, kv_view, state_view) -> list:
    """mlx-lm's cache list for one forward: ``kv_view(i)`` for attention layer ``i``,
    ``state_view(entry)`` for a linear layer, tuples where a layer keeps both."""

    def build(entry):
        if isinstance(entry, list):
            return tuple(build(e) for e in entry)
        return kv_view(entry.index) if entry.kind == "kv" else state_view(entry)

    return [build(entry) for entry in layout]


def flat(layout: list) -> list[CacheEntry]:
    """Every entry, a CacheList's flattened."""
    return [e for entry in layout for e in (entry if isinstance(entry, list) else [entry])]
