"""pico-vllm: vLLM's architecture, re-built readable and fast for Apple Silicon on MLX."""

from pico_vllm.config import EngineConfig
from pico_vllm.engine.llm_engine import LLMEngine
from pico_vllm.llm import LLM
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
