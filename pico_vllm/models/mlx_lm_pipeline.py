"""Pipeline parallelism for mlx-lm's model code (behind ``mlx_lm_adapter.py``): a stage of its layers.

mlx-lm's backbone runs its own loop over ``self.layers`` (masks from ``cache[0]``, per-index
layer types), so nothing of that loop is rewritten. The layers list keeps its length and
indices; only its entries change:

- a layer outside this rank's stage becomes :class:`SkippedLayer` (no weights; hands its input on);
- on every stage but the first, the stage's first layer is wrapped in :class:`ReceivingLayer`:
  it ignores the embeddings the backbone computed and runs on the previous stage's hidden states;
- on every stage but the last, the stage's last layer is wrapped in :class:`SendingLayer`: its
  output goes to the next stage (the adapter returns that send; the LM head runs on no rows).

The embeddings and the LM head stay on every rank: the backbone calls them, so a stage that
does not need them still looks the embeddings up (the receiving layer ignores them) and runs
the head on no rows. The memory they take on the other stages is the price of leaving
mlx-lm's code untouched. A stage receives hidden states of the one dtype a probe forward found
between every two layers (:func:`hidden_dtype`); layers that return more than their hidden
states, or change dtype, are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from pico_vllm.pipeline import PipelineStage, parameter_bytes, split_layers


class SkippedLayer(nn.Module):
    """A layer another stage holds: no weights, its input passes through unchanged. It keeps
    the layer's plain attributes (``use_sliding``, ...), which backbones read to pick masks."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
                setattr(self, key, value)

    def __call__(self, *args, **kwargs) -> mx.array:
        return _hidden(args, kwargs)


class _Wrapping(nn.Module):
    """A layer in a wrapper that answers for it: what the backbone reads of the layer (its
    ``use_sliding``, ...) comes from the layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def __getattr__(self, key: str):
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key == "layer":
                raise
            return getattr(self.layer, key)


class ReceivingLayer(_Wrapping):
    """The stage's first layer, run on the hidden states the previous stage sent."""

    def __init__(self, layer: nn.Module, stage: PipelineStage, dtype: mx.Dtype) -> None:
        super().__init__(layer)
        self.pipeline_stage, self.hidden_dtype = stage, dtype

    def __call__(self, *args, **kwargs):
        received = self.pipeline_stage.receive(_hidden(args, kwargs).shape, self.hidden_dtype)
        args, kwargs = _with_hidden(args, kwargs, received)
        return self.layer(*args, **kwargs)


class Outbox:
    """Where a :class:`SendingLayer` leaves its send for the adapter (a plain object: an array
    set on a module would count among its parameters)."""

    sent: mx.array | None = None


class SendingLayer(_Wrapping):
    """The stage's last layer; its output is sent on, and the send left in ``outbox``."""

    def __init__(self, layer: nn.Module, stage: PipelineStage) -> None:
        super().__init__(layer)
        self.pipeline_stage, self.outbox = stage, Outbox()

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.outbox.sent = self.pipeline_stage.send(out)
        return out


class _Recorder(_Wrapping):
    """A layer that notes the dtype of what goes in and out (for :func:`hidden_dtype`)."""

    def __init__(self, layer: nn.Module, dtypes: set) -> None:
        super().__init__(layer)
        self.dtypes = dtypes  # shared by every recorder of the probe (a set: not a parameter)

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.dtypes |= {_hidden(args, kwargs).dtype, getattr(out, "dtype", None)}
        return out


def _hidden(args: tuple, kwargs: dict) -> mx.array:
    """A layer call's hidden states: its first argument, positional or by name (GPT-J's
    ``inputs=``)."""
    return args[0] if args else next(iter(kwargs.values()))


def _with_hidden(args: tuple, kwargs: dict, hidden: mx.array) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, next(iter(kwargs)): hidden}


def hidden_dtype(layers: list, probe: Callable[[], object], model_type: str) -> mx.Dtype:
    """The one dtype of the hidden states between ``layers`` in a ``probe`` forward (shapes and
    dtypes only: nothing is computed); ValueError if they change dtype or are not arrays, as
    a stage could not know what to receive."""
    seen: set = set()
    originals = list(layers)
    layers[:] = [_Recorder(layer, seen) for layer in originals]
    try:
        probe()
    finally:
        layers[:] = originals
    if None in seen:
        raise ValueError(f"mlx-lm's {model_type!r} layers return more than their hidden states (a "
                         "tuple: state shared with later layers), which pipeline parallelism cannot send on")
    if len(seen) != 1:
        raise ValueError(f"mlx-lm's {model_type!r} layers pass on hidden states of several dtypes "
                         f"({', '.join(sorted(map(str, seen)))}): a stage could not know what "
                         "it receives")
    return next(iter(seen))


def check_splittable(model_type: str, layout: list, windows: tuple[int | None, ...], has_state: bool,
                     num_layers: int) -> None:
    """ValueError, with the reason, for a model a stage could not run exactly yet (``layout``:
    its cache entries; ``num_layers``: its decoder layers)."""
    name = f"mlx-lm's {model_type!r}"
    if has_state:
        raise ValueError(f"{name} keeps recurrent state in its linear layers, which pipeline "
                         "parallelism does not split yet: serve it on one rank")
    if len(set(windows)) > 1:
        raise ValueError("pipeline parallelism does not split a model whose layers attend over "
                         "different windows yet (every rank must keep the same layer groups)")
    if len(layout) != num_layers or any(isinstance(entry, list) or entry.index != i
                                        for i, entry in enumerate(layout)):
        raise ValueError(f"{name} does not keep one K/V cache per decoder layer: pipeline "
                         "parallelism cannot tell which of them a stage holds")


def layer_list(backbone: nn.Module) -> list:
    """The backbone's own list of decoder layers (``children()`` would hand back a copy)."""
    return next(c for c in backbone.values()
                if isinstance(c, list) and c and all(isinstance(m, nn.Module) for m in c))


def split_backbone(layers: list, model: nn.Module, group: mx.distributed.Group,
                   hidden_dtype: mx.Dtype) -> tuple[PipelineStage, Outbox | None]:
    """Turn ``layers`` (the backbone's list, in place) into this rank's stage of them, balanced
    by parameter bytes (``pipeline.split_layers``; everything outside the layers counted on the
    last stage, which runs the LM head); returns the stage and its sending layer's outbox (None
    on the last stage)."""
    costs = [parameter_bytes(layer) for layer in layers]
    head = parameter_bytes(model) - sum(costs)
    stage = PipelineStage(group, split_layers(costs, head, group.size())[group.rank()])
    first, last = stage.layers.start, stage.layers.stop - 1
    outbox = None
    for i in range(len(layers)):
        if i not in stage.layers:
            layers[i] = SkippedLayer(layers[i])
    if not stage.is_first:
        layers[first] = ReceivingLayer(layers[first], stage, hidden_dtype)
    if not stage.is_last:
        layers[last] = SendingLayer(layers[last], stage)
        outbox = layers[last].outbox
    return stage, outbox

