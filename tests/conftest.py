"""Shared fixtures: random-weight models built once per test session, keyed by their shape.

``make test`` runs everything; ``pytest -m "not slow"`` is the fast inner loop (it skips the
embedded-model runs, the sanitizer builds of the emulated kernel and the benchmark)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from model_factory import make_random_model


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Callable[..., Path]:
    """``random_model(arch, **kwargs)`` -> the folder of that random model, built on first use."""
    root = tmp_path_factory.mktemp("random_models")
    built: dict[tuple, Path] = {}

    def get(arch: str = "llama", **kwargs) -> Path:
        key = (arch, *sorted(kwargs.items()))
        if key not in built:
            name = "-".join([arch] + [f"{k}{v}" for k, v in sorted(kwargs.items())])
            built[key] = make_random_model(root / name, arch, **kwargs)
        return built[key]

    return get


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="session")
def chat_model(random_model, tmp_path_factory) -> Path:
    """A random Llama (head_dim 32) whose tokenizer has a chat template: what the server tests serve."""
    target = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(random_model("llama", head_dim=32), target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}))
    return target
