"""Model registry and loading: our own flat-batch files where we have one, mlx-lm's model
classes behind the paged adapter (``mlx_lm_adapter.py``) for every other architecture."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes as mlx_lm_model_classes
from mlx_lm.utils import dequantize_model, load_model

from metal_kernels import metal_available
from pico_vllm.models import gemma2, llama, qwen2, qwen3
from pico_vllm.models.mlx_lm_adapter import MlxLmModel

MODEL_CLASSES = {
    "llama": (llama.Model, llama.ModelArgs),
    "mistral": (llama.Model, llama.ModelArgs),
    "qwen2": (qwen2.Model, qwen2.ModelArgs),
    "qwen3": (qwen3.Model, qwen3.ModelArgs),
    "gemma2": (gemma2.Model, gemma2.ModelArgs),
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_CLASSES)
MODEL_IMPLS = ("auto", "pico-vllm", "mlx-lm")


def uses_own_file(config: dict, model_impl: str = "auto") -> bool:
    """Whether ``config`` runs on one of our model files (else on mlx-lm's, through the adapter).

    ``"auto"`` picks ours where we have the architecture and the file applies the checkpoint's
    sliding window, if it has one; ``"pico-vllm"`` insists on ours, ``"mlx-lm"`` on mlx-lm's.
    """
    if model_impl == "pico-vllm":
        get_model_classes(config)  # raises for an architecture we have no file for
        return True
    if model_impl == "mlx-lm" or config.get("model_type") not in MODEL_CLASSES:
        return False
    return get_model_classes(config)[0].implements_sliding_window or sliding_window(config) is None


def text_config(config: dict) -> dict:
    """The language model's settings: multimodal checkpoints (Gemma 3, Mistral 3, ...) nest them
    under ``text_config``; mlx-lm serves their text part."""
    return {**config, **config.get("text_config", {})}


def resolve_dtype(dtype: str, checkpoint_dtype: mx.Dtype) -> mx.Dtype:
    """``"auto"`` -> float32 on the CPU, the checkpoint's dtype on Metal; else the named dtype."""
    if dtype != "auto":
        return getattr(mx, dtype)
    return checkpoint_dtype if metal_available() else mx.float32


def sliding_window(config: dict) -> int | None:
    """The sliding window a checkpoint's attention uses, or None for full attention everywhere.
    Our model files implement full attention only; the engine refuses a window that could bind
    (see ``LLMEngine``) rather than silently attending further back than the model was trained to.
    Qwen2/Qwen3 configs carry a ``sliding_window`` that only ``use_sliding_window`` switches on;
    ``layer_types`` names the sliding layers where a config lists them."""
    window = config.get("sliding_window")
    if window is None:
        return None
    if config.get("layer_types") is not None:
        return window if any("sliding" in str(kind) for kind in config["layer_types"]) else None
    if config.get("model_type") in ("qwen2", "qwen3"):
        return window if config.get("use_sliding_window") else None
    return window


def get_model_classes(config: dict) -> tuple[type[nn.Module], type]:
    """``(Model, ModelArgs)`` for ``config["model_type"]``; ValueError if unsupported."""
    model_type = config.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    return MODEL_CLASSES[model_type]


def mlx_lm_classes(config: dict) -> tuple[type[nn.Module], type]:
    """mlx-lm's ``(Model, ModelArgs)`` for ``config``; ValueError naming both registries if neither
    has the architecture, or if mlx-lm's arguments class rejects the config."""
    try:
        model_class, args_class = mlx_lm_model_classes(config)
    except ValueError:
        raise ValueError(
            f"unsupported architecture {config.get('model_type')!r}: pico-vllm has no file for it "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}) and mlx-lm has no model for it either"
        ) from None

    class CheckedArgs(args_class):
        @classmethod
        def from_dict(cls, params: dict):
            try:
                return args_class.from_dict(params)
            except (TypeError, KeyError) as e:
                raise ValueError(f"mlx-lm's {config.get('model_type')!r} model cannot be built "
                                 f"from this config: {e}") from None

    return model_class, CheckedArgs


def build_model(
    config: dict, weights: dict[str, mx.array], dtype: str = "auto", model_impl: str = "auto"
) -> nn.Module:
    """Instantiate the model for ``config``, load ``weights`` (HF names; quantized triplets when
    ``config["quantization"]`` is set) strictly, and prepare it for this device."""
    own = uses_own_file(config, model_impl)
    model_class, args_class = get_model_classes(config) if own else mlx_lm_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(weights)
    if quantization := config.get("quantization"):
        # Per-module overrides (a dict under the module's path) win over the common setting.
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda path, _: (
                quantization.get(path, True) if f"{path}.scales" in weights else False
            ),
        )
    model.load_weights(list(weights.items()), strict=True)
    model = prepare_for_device(model, dtype)
    return model if own else MlxLmModel(model, config["model_type"])


def load_model_dir(path: Path, dtype: str = "auto", model_impl: str = "auto") -> tuple[nn.Module, dict]:
    """Load a local HF / mlx-community folder (config.json + *.safetensors)."""
    from mlx_lm.utils import load_config

    own = uses_own_file(load_config(Path(path)), model_impl)
    classes = get_model_classes if own else mlx_lm_classes
    model, config = load_model(Path(path), lazy=True, get_model_classes=classes)
    model = prepare_for_device(model, dtype)
    return (model if own else MlxLmModel(model, config["model_type"])), config


def checkpoint_dtype(model: nn.Module) -> mx.Dtype:
    """The floating-point dtype most of ``model``'s parameters have (quantized weights aside)."""
    counts: dict[mx.Dtype, int] = {}
    for _, p in nn.utils.tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            counts[p.dtype] = counts.get(p.dtype, 0) + p.size
    return max(counts, key=counts.get) if counts else mx.float32


def prepare_for_device(model: nn.Module, dtype: str) -> nn.Module:
    """Cast to the compute dtype. On the CPU quantized matmuls are no faster than fp32, so
    quantized layers are dequantized there; on Metal they stay quantized."""
    compute = resolve_dtype(dtype, checkpoint_dtype(model))
    if compute == mx.float32:
        model = dequantize_model(model)
    model.set_dtype(compute)
    return model  # still lazy: the loader reads the weights (all, or a pipeline stage's)
