"""The front door for ``--model``: the embedded default, a ``.gguf`` file, a local folder, or a
Hugging Face id — each turned into our model plus an mlx-lm tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from pico_vllm.gguf import embedded_model_path, load_gguf
from pico_vllm.models import build_model, checkpoint_dtype, load_model_dir, text_config

DEFAULT_MAX_MODEL_LEN = 4096  # for configs that state no limit


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict
    eos_token_ids: set[int]
    max_model_len: int
    name: str
    dtype: mx.Dtype  # the compute dtype: activations and the KV pool



def load(model: str | None = None, dtype: str = "auto", model_impl: str = "auto",
         lazy: bool = False) -> LoadedModel:
    """Load ``model`` (see the module docstring); ``None`` is the embedded SmolLM2-135M.
    ``model_impl`` picks our own model file or mlx-lm's (see ``models.uses_own_file``).
    ``lazy`` leaves the weights unread until evaluated: a pipeline stage reads only its layers."""
    loaded = _load(model, dtype, model_impl)
    if not lazy:
        mx.eval(loaded.model.parameters())
    return loaded


def _load(model: str | None, dtype: str, model_impl: str) -> LoadedModel:
    if model is None or str(model).endswith(".gguf"):
        path = embedded_model_path() if model is None else Path(model).expanduser()
        config, weights, tokenizer = load_gguf(path)
        net = build_model(config, weights, dtype, model_impl)
        return _loaded(net, tokenizer, config, name=path.name)
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model):
            raise FileNotFoundError(f"model path does not exist: {model}")
        try:
            path = _download(model)
        except Exception as e:  # offline, unknown repo, gated, ...: one line that names the model
            raise FileNotFoundError(
                f"model {model!r} is not a local path and could not be downloaded from the Hugging "
                f"Face Hub (offline?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in model folder {path}")
    net, config = load_model_dir(path, dtype, model_impl)
    return _loaded(net, load_tokenizer(path), config, name=str(model), folder=path)


def _loaded(
    net: nn.Module, tokenizer: TokenizerWrapper, config: dict, name: str, folder: Path | None = None
) -> LoadedModel:
    eos = set(tokenizer.eos_token_ids)
    for source in (config, _generation_config(folder)):
        ids = source.get("eos_token_id")
        eos.update([ids] if isinstance(ids, int) else ids or [])
    max_len = text_config(config).get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
    # prepare_for_device cast every float parameter to the compute dtype.
    dtype = checkpoint_dtype(net)
    return LoadedModel(net, tokenizer, config, eos, int(max_len), name, dtype)


def _generation_config(folder: Path | None) -> dict:
    path = folder / "generation_config.json" if folder else None
    return json.loads(path.read_text()) if path and path.exists() else {}


def _looks_like_path(model: str) -> bool:
    """A hub id is ``org/name`` or a bare ``name`` (``gpt2``); anything else that doesn't exist is
    a missing path."""
    parts = model.split("/")
    return model.startswith(("/", ".", "~")) or len(parts) > 2 or not all(parts)


def _download(repo_id: str) -> Path:
    """Fetch a Hugging Face repo's config, tokenizer and weights (mlx-lm's download rules)."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
