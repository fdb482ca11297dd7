"""pico-vllm: vLLM's architecture, re-built readable and fast for Apple Silicon on MLX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pico-vllm")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from pico_vllm.config import EngineConfig  # noqa: E402 (after __version__, which cli imports)
from pico_vllm.engine.llm_engine import LLMEngine
from pico_vllm.llm import LLM
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
