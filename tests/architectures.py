"""Walk every model in ``mlx_lm.models``: build a tiny random model of each, serve it, compare.

Each architecture ends in one of:

- ``served``: the engine loads it and its greedy tokens and top-5 logprobs equal mlx-lm's on
  prompts longer than any window, in one batch with chunked prefill;
- ``refused``: the engine stops at load with an error that says why (the reason is recorded);
- ``untested``: no tiny model could be built (mlx-lm itself fails on the tiny config, or the
  module needs a package we do not install), so nothing is claimed.

A model that loads and then differs from mlx-lm (``mismatch``) fails the walk: that would be
silently wrong. ``architectures.json`` keeps the last walk's records; the README's table is
rendered from it (``tests/test_every_architecture.py`` checks both). Refresh both with

    uv run python tests/architectures.py
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import re
import sys
import tempfile
import traceback
import typing
from pathlib import Path

from model_factory import HYBRID_EXTRAS

HERE = Path(__file__).parent
RECORDS = HERE / "architectures.json"
README = HERE.parent / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- architectures: begin -->", "<!-- architectures: end -->"
WINDOW = 16
MAX_TOKENS = 6

# Tiny values for the fields mlx-lm's ModelArgs classes call by these names.
TINY = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "model_dim": 64, "dim": 64, "hidden_dim": 64,
    "num_hidden_layers": 4, "n_layer": 4, "n_layers": 4, "num_layers": 4,
    "num_transformer_layers": 4,
    "intermediate_size": 128, "n_inner": 128, "ffn_hidden_size": 128, "ff_intermediate_size": 128,
    "intermediate_size_mlp": 128, "shared_intermediate_size": 64, "expert_ffn_hidden_size": 32,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "num_query_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "rotary_dim": 8, "vocab_size": 512, "num_vocab": 512,
    "max_position_embeddings": 512, "n_positions": 512, "n_ctx": 512, "model_max_length": 512,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "rms_norm_eps": 1e-5, "layer_norm_eps": 1e-5, "layer_norm_epsilon": 1e-5, "norm_eps": 1e-5,
    "layernorm_epsilon": 1e-5, "rope_theta": 10000.0,
}
# Windows shorter than the prompts, where the architecture has one (a field without a None
# default): set only there, so a model that ignores the field is not handed a window.
WINDOW_FIELDS = ("sliding_window", "sliding_window_size", "attention_window_size")
# Patterns of local and global layers: both kinds within the 4 layers.
PATTERN_FIELDS = {"sliding_window_pattern": 2}
LAYER_TYPES = ["sliding_attention", "full_attention"] * 2
# Fields whose name or type says nothing usable; values that build these architectures.
OVERRIDES: dict[str, dict] = {
    "gemma3_text": {"query_pre_attn_scalar": 16},
    "gemma2": {"query_pre_attn_scalar": 16},
    "qwen3_moe": {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "exaone4": {"sliding_window_pattern": "LG", "rope_scaling": None},
    "llama4_text": {"no_rope_layers": [1, 1, 1, 0], "intermediate_size_mlp": 128,
                    "interleave_moe_layer_step": 2, "attention_chunk_size": 64},
    "dbrx": {"ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0}},
    "gptj": {"rotary_dim": 8},
    "phixtral": {"rotary_dim": 8},
    "exaone_moe": {"is_moe_layer": [False, True, True, True]},
    "afm7": {"num_kv_reuse_layers": 0},
    "olmo3": {"layer_types": None},
    "ministral3": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default",
                                       "llama_4_scaling_beta": 0.1,
                                       "original_max_position_embeddings": 512}},
    "gemma4_text": {"num_kv_shared_layers": 2, "hidden_size_per_layer_input": 16,
                    "vocab_size_per_layer_input": 512, "global_head_dim": 32},
    "hunyuan": {"rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}},
    "laguna": {"layer_types": LAYER_TYPES},
}
# Hybrids whose tiny config the common fields cannot make (tests/model_factory.py has them).
OVERRIDES |= {name: HYBRID_EXTRAS[name] for name in ("lfm2", "nemotron_h", "granitemoehybrid")}
# Wrappers whose text model needs the same (their text_config is built from the inner type).
OVERRIDES["gemma4"] = {"text_config": {**OVERRIDES["gemma4_text"]}}
OVERRIDES["llama4"] = {"text_config": {"num_experts_per_tok": 1}}


@dataclasses.dataclass
class Record:
    status: str  # served | refused | untested
    detail: str = ""


def model_types() -> list[str]:
    """Every module of ``mlx_lm.models`` that defines a ``Model`` (helpers like ``cache`` do not)."""
    import mlx_lm.models

    names = [m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)]
    helpers = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline", "gated_delta",
               "ssm", "mla", "bitlinear_layers"}
    return sorted(n for n in names if n not in helpers)


def tiny_config(model_type: str) -> dict:
    """A config for a four-layer, 64-wide model of ``model_type`` (raises if none can be made)."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    config = {"model_type": model_type, "tie_word_embeddings": False,
              **_tiny_fields(module.ModelArgs, module)}
    for key, value in OVERRIDES.get(model_type, {}).items():
        config[key] = {**config[key], **value} if key == "text_config" else value
    return config


def _tiny_fields(args_class: type, module) -> dict:
    hints = typing.get_type_hints(args_class)
    config: dict = {}
    for field in dataclasses.fields(args_class):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if field.name == "model_type":
            continue
        if field.name in TINY:
            config[field.name] = TINY[field.name]
        elif field.name in WINDOW_FIELDS:
            if required or field.default is not None:
                config[field.name] = WINDOW
        elif field.name in PATTERN_FIELDS and (required or field.default is not None):
            config[field.name] = PATTERN_FIELDS[field.name]
        elif field.name == "layer_types" and required:
            config[field.name] = LAYER_TYPES
        elif field.name == "text_config":
            config["text_config"] = _tiny_text_config(module)
        elif required:
            config[field.name] = _guess(hints.get(field.name))
    return config


def _tiny_text_config(module) -> dict:
    """A multimodal wrapper's text model: a sibling module it imports (gemma3 -> gemma3_text), or
    an arguments class of its own (``TextArgs``, ``TextConfig``)."""
    for name, value in vars(module).items():
        if getattr(value, "__name__", "").startswith("mlx_lm.models.") and hasattr(value, "ModelArgs"):
            return tiny_config(name)
    for name, value in vars(module).items():
        if "Text" in name and dataclasses.is_dataclass(value):
            return {"model_type": module.__name__.rsplit(".", 1)[-1], **_tiny_fields(value, module)}
    return {}


def _guess(hint) -> object:
    origin = typing.get_origin(hint)
    if hint is bool:
        return False
    if hint is int:
        return 2
    if hint is float:
        return 1.0
    if hint is str:
        return ""
    if origin in (list, tuple) or hint in (list, tuple):
        return []
    if origin is dict or hint is dict:
        return {}
    return None


def check(model_type: str, root: Path) -> Record:
    """Build, serve and compare one architecture (see the module docstring)."""
    sys.path.insert(0, str(HERE))
    from model_factory import save_random_model
    from test_architectures import check_against_oracle
    from test_engine_parity import Oracle, prompts_for

    from pico_vllm import EngineConfig, LLMEngine, SamplingParams

    try:
        path = save_random_model(root / model_type, tiny_config(model_type))
    except BaseException as e:  # noqa: BLE001 -- mlx-lm's own failure on this config, recorded
        return Record("untested", _first_line(e))
    try:
        engine = LLMEngine(EngineConfig(model=str(path), max_num_seqs=4, max_num_batched_tokens=24,
                                        num_blocks=64))
    except ValueError as e:
        return Record("refused", _first_line(e))
    except Exception as e:
        if "/transformers/" not in traceback.extract_tb(e.__traceback__)[-1].filename:
            raise
        # The tokenizer's loader reads config.json through transformers, whose own checks can
        # reject a tiny config mlx-lm accepts: nothing is claimed about the architecture then.
        return Record("untested", "transformers rejects the tiny config: " + _first_line(e))
    # mlx-lm's own run only for what the engine serves (phi3small's, for one, crashes the
    # process in a later garbage collection).
    prompts = prompts_for(512, [3, WINDOW + 9, 3 * WINDOW], seed=0)
    try:
        oracle = Oracle(path)
        oracle(prompts[0], MAX_TOKENS)
    except Exception as e:
        return Record("untested", "mlx-lm's own generation fails: " + _first_line(e))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    try:
        ids = [engine.add_request(p, params) for p in prompts]
        final = {}
        while engine.has_unfinished_requests():
            final |= {o.request_id: o for o in engine.step() if o.finished}
    except Exception as e:  # loaded, then failed: a defect, as a mismatch is
        return Record("crash", _first_line(e))
    try:
        check_against_oracle([final[i] for i in ids], prompts, oracle, MAX_TOKENS)
    except AssertionError as e:
        return Record("mismatch", _first_line(e))
    return Record("served", _how(engine.model))


def _how(model) -> str:
    """Which code serves it, and the attention variants it uses."""
    from pico_vllm.models.mlx_lm_adapter import MlxLmModel

    if not isinstance(model, MlxLmModel):
        return f"pico-vllm's own `{type(model).__module__.rsplit('.', 1)[-1]}.py`" + (
            "; sliding windows" if any(model.layer_windows) else "")
    parts = ["mlx-lm adapter"]
    if any(model.layer_windows):
        parts.append("sliding windows")
    if any(layer.has_sinks for layer in model.plan):
        parts.append("attention sinks")
    if model.state_spec is not None:
        parts.append(f"hybrid: {len(model.state_spec.layers)} linear layers' state in the state pool")
    if not model.supports_graphs:
        parts.append("decode steps eager (the model reads arrays back mid-forward)")
    return "; ".join(parts)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = re.sub(r"/tmp/\S+", "...", text)
    return f"{type(error).__name__}: {text}"[:200]


def walk(model_types_: list[str] | None = None) -> dict[str, Record]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: check(name, Path(tmp)) for name in model_types_ or model_types()}


def render_table(records: dict[str, Record]) -> str:
    """The README's table: one row per architecture, served ones first."""
    order = {"served": 0, "refused": 1, "untested": 2}
    counts = {s: sum(r.status == s for r in records.values()) for s in order}
    lines = [f"{counts['served']} served, {counts['refused']} refused at load, {counts['untested']} "
             f"untested, of {len(records)} modules in mlx-lm's `models/`:", "",
             "| `model_type` | status | how / why |", "|---|---|---|"]
    for name, record in sorted(records.items(), key=lambda kv: (order[kv[1].status], kv[0])):
        detail = record.detail.replace("|", "\\|")
        lines.append(f"| `{name}` | {record.status} | {detail} |")
    return "\n".join(lines)


def load_records() -> dict[str, Record]:
    return {name: Record(**value) for name, value in json.loads(RECORDS.read_text()).items()}


def readme_table() -> str:
    text = README.read_text()
    return text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN) : text.index(TABLE_END)].strip()


def main() -> None:
    records = walk()
    RECORDS.write_text(json.dumps({k: dataclasses.asdict(v) for k, v in records.items()}, indent=1) + "\n")
    text = README.read_text()
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + render_table(records) + "\n" + text[end:])
    print(render_table(records))


if __name__ == "__main__":
    import pico_vllm  # noqa: F401 -- OpenBLAS before MLX

    main()
