"""One dataclass that configures the whole engine (standard library only: the CLI validates its
flags with it before MLX is imported)."""

from __future__ import annotations

from dataclasses import dataclass, fields

# On the CPU backend there is no unified-memory budget to read, so the pool gets a fixed size.
CPU_KV_CACHE_BYTES = 512 * 1024**2


@dataclass
class EngineConfig:
    """Everything the engine needs to know besides the model weights.

    Attributes:
        model: Hugging Face id, local HF-format folder, or ``.gguf`` file; ``None`` picks the
            embedded SmolLM2-135M-Instruct.
        model_impl: ``"auto"`` runs our own model file where there is one for the architecture
            that applies the checkpoint's sliding window, if it has one (Llama, Mistral, Qwen2,
            Qwen3 without a window; Gemma 2), and mlx-lm's model code through the paged adapter
            for every other; ``"pico-vllm"`` or ``"mlx-lm"`` insists on one of them.
        dtype: ``"auto"`` computes in float32 on the CPU (fp16/bf16 matmuls are ~27x slower
            there) and keeps the checkpoint's dtype on Metal; or one of
            ``"float32" | "float16" | "bfloat16"``.
        block_size: tokens per KV block (8, 16 or 32).
        num_blocks: KV blocks in the pool; ``None`` derives it from ``kv_cache_bytes``.
        kv_cache_bytes: KV memory budget (a hybrid model's state pool included); ``None`` means
            the Metal recommended working set minus the weights, or 512 MiB on the CPU
            (``CPU_KV_CACHE_BYTES``).
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: token budget of one step (decode tokens + prefill chunks).
        max_model_len: longest prompt + output; ``None`` takes the model's own limit.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        num_state_snapshots: a hybrid model's prefix cache: state-pool slots holding its linear
            layers' state at a block boundary, which a prompt with that prefix resumes from (each
            as large as a sequence's state); ``None`` means ``max_num_seqs``, 0 computes every
            hybrid prompt in full. Models without linear layers have none.
        capture_graphs: decode-only steps run through graphs captured with ``mx.compile``,
            one per (batch, block-table width) bucket: ``"lazy"`` traces a bucket's graph on its
            first step, ``"startup"`` traces all of them when the engine starts (as vLLM
            captures CUDA graphs); ``"off"`` runs every step eagerly.
        enforce_eager: vLLM's name for ``capture_graphs="off"``.
        disable_cascade_attn: never use cascade attention (vLLM's name). Otherwise decode
            steps in which several sequences share leading KV blocks read those blocks once for
            all of them (exact; see ``metal_kernels.cascade_attention``).
        async_scheduling: queue step n+1 before reading step n back, so the host's scheduling
            and detokenizing overlap the model's compute (greedy outputs are unchanged).
        seed: seed of the global RNG used by requests that give no seed of their own.
        tensor_parallel_size: ranks the model is split over (tensor parallelism); more than 1
            needs that many processes started by ``mlx.launch`` (see the README).
        pipeline_parallel_size: stages the model's layers are split over (pipeline
            parallelism), one per process started by ``mlx.launch``; each holds a slice of the
            layers and their KV pool, and a step's batch goes down the stages in micro-batches.
        speculative_config: speculative decoding, as vLLM spells it (JSON on the command line):
            ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}`` drafts tokens by prompt lookup, ``{"model": "<path or id>",
            "num_speculative_tokens": 4}`` with a smaller model of the same vocabulary; the
            drafts are verified in the batch and outputs are unchanged (steps that verify or
            are about to draft are read back before the next is queued).
    """

    model: str | None = None
    model_impl: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_state_snapshots: int | None = None
    enforce_eager: bool = False
    capture_graphs: str = "lazy"
    disable_cascade_attn: bool = False
    async_scheduling: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    speculative_config: dict | None = None

    def __post_init__(self) -> None:
        if self.model_impl not in ("auto", "pico-vllm", "mlx-lm"):
            raise ValueError(
                f"model_impl must be 'auto', 'pico-vllm' or 'mlx-lm', got {self.model_impl!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {self.dtype!r}"
            )
        if self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        for name in ("num_blocks", "kv_cache_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_state_snapshots is not None and self.num_state_snapshots < 0:
            raise ValueError(f"num_state_snapshots must be >= 0, got {self.num_state_snapshots}")
        if self.capture_graphs not in ("off", "lazy", "startup"):
            raise ValueError(
                f"capture_graphs must be 'off', 'lazy' or 'startup', got {self.capture_graphs!r}"
            )
        if self.enforce_eager:  # vLLM's spelling of "off": one setting, not two that can disagree
            if self.capture_graphs == "startup":
                raise ValueError(
                    "enforce_eager=True captures no graphs: it contradicts capture_graphs='startup'"
                )
            self.capture_graphs = "off"
        self.enforce_eager = self.capture_graphs == "off"
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size cannot both be above 1 yet: "
                             "pick one (tensor parallelism within a Mac pair over Thunderbolt, pipeline "
                             "parallelism across slower links)")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.speculative_config is not None:  # validated now, before any model is loaded
            SpeculativeConfig.from_dict(self.speculative_config)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """``speculative_config`` validated, or None without speculation."""
        if self.speculative_config is None:
            return None
        return SpeculativeConfig.from_dict(self.speculative_config)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``: draft up to ``num_speculative_tokens`` tokens per step,
    by prompt lookup (``method`` "ngram": what followed the latest earlier occurrence of the last
    ``n`` tokens, ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``) or with a
    draft ``model`` (``method`` "draft_model", implied by ``model``)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None

    @classmethod
    def from_dict(cls, config: dict) -> SpeculativeConfig:
        """Validated: an unknown key, another method or a bad size is a ValueError naming it."""
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        method = config.get("method", "draft_model" if config.get("model") is not None else "ngram")
        if method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config: method {method!r} is not supported; 'ngram' "
                             "(prompt lookup) and 'draft_model' (with 'model') are")
        if (method == "draft_model") != (config.get("model") is not None):
            raise ValueError("speculative_config: 'model' (a draft model's path or id) goes with "
                             f"method 'draft_model', and only with it (method {method!r})")
        if method == "draft_model" and not isinstance(config["model"], str):
            raise ValueError(f"speculative_config: model must be a str, got {config['model']!r}")
        spec = cls(**config | {"method": method})
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(spec, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an int >= 1, got {value!r}")
        if spec.prompt_lookup_min > spec.prompt_lookup_max:
            raise ValueError("speculative_config: prompt_lookup_min must be <= prompt_lookup_max, "
                             f"got {spec.prompt_lookup_min} > {spec.prompt_lookup_max}")
        return spec

