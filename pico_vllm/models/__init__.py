"""Model registry and loading: HF config ``model_type`` -> our flat-batch model classes."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import dequantize_model, load_model

from metal_kernels import metal_available
from pico_vllm.models import llama, qwen2, qwen3

MODEL_CLASSES = {
    "llama": (llama.Model, llama.ModelArgs),
    "mistral": (llama.Model, llama.ModelArgs),
    "qwen2": (qwen2.Model, qwen2.ModelArgs),
    "qwen3": (qwen3.Model, qwen3.ModelArgs),
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_CLASSES)


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
    if "layer_types" in config:
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


def build_model(config: dict, weights: dict[str, mx.array], dtype: str = "auto") -> nn.Module:
    """Instantiate the model for ``config``, load ``weights`` (HF names; quantized triplets when
    ``config["quantization"]`` is set) strictly, and prepare it for this device."""
    model_class, args_class = get_model_classes(config)
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
    return prepare_for_device(model, dtype)


def load_model_dir(path: Path, dtype: str = "auto") -> tuple[nn.Module, dict]:
    """Load a local HF / mlx-community folder (config.json + *.safetensors)."""
    model, config = load_model(Path(path), lazy=True, get_model_classes=get_model_classes)
    return prepare_for_device(model, dtype), config


def prepare_for_device(model: nn.Module, dtype: str) -> nn.Module:
    """Cast to the compute dtype. On the CPU quantized matmuls are no faster than fp32, so
    quantized layers are dequantized there; on Metal they stay quantized."""
    compute = resolve_dtype(dtype, model.model.norm.weight.dtype)
    if compute == mx.float32:
        model = dequantize_model(model)
    model.set_dtype(compute)
    mx.eval(model.parameters())
    return model
