"""pico-vllm: vLLM's architecture, re-built readable and fast for Apple Silicon on MLX.

Importing the package is cheap: it only makes sure MLX will use Debian's OpenBLAS on Linux
(``pico_vllm/openblas.py``, which must run before MLX is first imported). ``LLM``,
``LLMEngine``, ``EngineConfig``, ``RequestOutput`` and ``SamplingParams`` are imported on first
use, so ``pico-vllm --version``, ``--help`` and argument errors never load MLX.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from pico_vllm.openblas import use_openblas

use_openblas()

try:
    __version__ = version("pico-vllm")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "LLM": "pico_vllm.llm",
    "LLMEngine": "pico_vllm.engine.llm_engine",
    "EngineConfig": "pico_vllm.config",
    "RequestOutput": "pico_vllm.outputs",
    "SamplingParams": "pico_vllm.sampling_params",
}
__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from pico_vllm.config import EngineConfig
    from pico_vllm.engine.llm_engine import LLMEngine
    from pico_vllm.llm import LLM
    from pico_vllm.outputs import RequestOutput
    from pico_vllm.sampling_params import SamplingParams


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pico_vllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
