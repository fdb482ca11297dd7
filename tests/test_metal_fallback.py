"""The kernels' guard rails, run on Linux by simulating Metal: availability, unsupported inputs,
and the per-instance self-check that sends an instance to the reference when its kernel fails
to build or computes a wrong result -- with the engine token-exact either way."""

from __future__ import annotations

import logging

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load as mlx_lm_load

import metal_kernels
from metal_kernels import kernel as kernel_module
from metal_kernels import paged_attention, paged_attention_metal, paged_attention_reference
from pico_vllm import LLM, SamplingParams


def inputs(head_dim=64, block_size=16, dtype=mx.float32, q_heads=4, kv_heads=2):
    q = mx.random.normal((2, q_heads, head_dim)).astype(dtype)
    pool = mx.random.normal((kv_heads, 8, block_size, head_dim)).astype(dtype)
    tables = mx.array([[0, 1, 2], [5, 4, 0]], dtype=mx.int32)
    return q, pool, pool * 0.5, tables, mx.array([40, 20], dtype=mx.int32), head_dim**-0.5


@pytest.fixture
def fake_metal(monkeypatch):
    """Pretend to be on a Mac, with a 'kernel' we control (by default the real one, whose
    pipelines cannot be built here: MLX fails when the graph is evaluated, as a Metal compile
    error would)."""
    monkeypatch.setattr(metal_kernels, "metal_available", lambda: True)
    monkeypatch.setattr(metal_kernels, "_verdicts", {})
    monkeypatch.setattr(metal_kernels, "_reported", set())
    calls = []

    def set_kernel(fn):
        def kernel(*args, **variants):
            calls.append(args)
            return fn(*args, **variants)

        monkeypatch.setattr(metal_kernels, "paged_attention_kernel", kernel)
        return calls

    return set_kernel


def test_no_metal_means_reference(monkeypatch):
    monkeypatch.setattr(metal_kernels, "metal_available", lambda: False)  # as on Linux
    args = inputs()
    assert paged_attention_metal(*args) is None
    assert mx.array_equal(paged_attention(*args), paged_attention_reference(*args))


def test_a_correct_kernel_is_used_after_its_self_check(fake_metal):
    calls = fake_metal(paged_attention_reference)
    args = inputs()
    out = paged_attention_metal(*args)
    assert out is not None and mx.allclose(out, paged_attention_reference(*args))
    assert len(calls) == 3  # the self-check's two cases (batches 3 and 9), then the real call
    assert [c[0].shape[0] for c in calls[:2]] == [3, 9] and all(c[0].dtype == mx.float32 for c in calls)
    paged_attention_metal(*args)
    assert len(calls) == 4  # the check runs once per instance and process


def test_the_self_check_runs_in_the_callers_dtype_with_partitions_and_padding(fake_metal):
    calls = fake_metal(paged_attention_reference)
    assert paged_attention_metal(*inputs(dtype=mx.bfloat16)) is not None
    for q, k_pool, v_pool, tables, lengths, _ in calls[:2]:
        assert q.dtype == k_pool.dtype == v_pool.dtype == mx.bfloat16
        assert 0 in lengths.tolist() and max(lengths.tolist()) > tables.shape[1] * k_pool.shape[2]
        config = kernel_module.launch_config(q, k_pool, tables)
        assert config["output_shapes"][0][2] > 1  # several partitions, as long contexts have


def test_a_wrong_kernel_fails_the_self_check_and_the_reference_takes_over(fake_metal, caplog):
    calls = fake_metal(lambda *a, **k: paged_attention_reference(*a, **k) + 0.01)
    args = inputs()
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*args) is None
        assert paged_attention_metal(*args) is None
    assert caplog.text.count("failed its self-check") == 1
    assert len(calls) == 2  # the check's cases; never called again after it failed
    assert mx.array_equal(paged_attention(*args), paged_attention_reference(*args))


@pytest.mark.parametrize("variant", ["window", "softcap", "sinks"])
def test_a_kernel_wrong_only_for_a_variant_fails_its_self_check(fake_metal, variant):
    """Windows, softcapping and sinks are run-time values of the same pipeline: the check runs
    them (its batch of 9), so a kernel that gets one wrong never serves a step."""
    def kernel(*args, **variants):
        wrong = dict(variants)
        if variant in variants:  # only the check's second case has variants
            wrong[variant] = variants[variant] + 1 if variant == "window" else None
        return paged_attention_reference(*args, **wrong)

    calls = fake_metal(kernel)
    assert paged_attention_metal(*inputs()) is None
    assert len(calls) == 2


def test_bf16_output_rounding_passes_but_a_bf16_error_past_it_does_not(fake_metal):
    # The reference rounds to bf16 too; a kernel one bf16 step off everywhere still passes,
    # one that is 5% off does not.
    fake_metal(lambda *a, **k: paged_attention_reference(*a, **k) * (1 + 2**-8))
    assert paged_attention_metal(*inputs(dtype=mx.bfloat16)) is not None
    metal_kernels._verdicts.clear()
    fake_metal(lambda *a, **k: paged_attention_reference(*a, **k) * 1.05)
    assert paged_attention_metal(*inputs(dtype=mx.bfloat16)) is None


def unbuildable(*args, **variants) -> mx.array:
    """A kernel whose failure comes when its graph is evaluated, not when it is called: how MLX
    reports a Metal library that does not build (it builds lazily, at the first ``mx.eval``)."""
    fails_when_evaluated = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)[0, 0]  # LU fails in eval
    return paged_attention_reference(*args, **variants) + fails_when_evaluated


def test_a_kernel_that_fails_only_when_evaluated_fails_its_self_check(fake_metal, caplog):
    calls = fake_metal(unbuildable)
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*inputs()) is None  # the check evaluated inside its try
    assert "failed its self-check" in caplog.text and "LU factorization failed" in caplog.text
    assert len(calls) == 1


def test_the_real_kernel_off_metal_fails_its_self_check(fake_metal, caplog):
    fake_metal(kernel_module.paged_attention_kernel)
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*inputs()) is None
    assert "No Metal back-end" in caplog.text


def test_a_crashing_kernel_fails_the_self_check(fake_metal, caplog):
    def crash(*_, **__):
        raise RuntimeError("Unable to build pipeline")

    fake_metal(crash)
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*inputs()) is None
    assert "Unable to build pipeline" in caplog.text


def test_each_instance_is_checked_on_its_own(fake_metal, caplog):
    """A kernel wrong only for head_dim 64: that instance falls back (one warning naming it),
    head_dim 128 keeps the kernel."""
    def kernel(q, *rest, **variants):
        out = paged_attention_reference(q, *rest, **variants)
        return out + 0.01 if q.shape[-1] == 64 else out

    fake_metal(kernel)
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*inputs(head_dim=64)) is None
        assert paged_attention_metal(*inputs(head_dim=128)) is not None
        assert paged_attention_metal(*inputs(head_dim=64)) is None
    assert caplog.text.count("failed its self-check") == 1 and "D=64" in caplog.text
    assert sorted(metal_kernels._verdicts.values()) == [False, True]


@pytest.mark.parametrize("kernel", ["wrong", "unbuildable", "correct"])
def test_the_engine_checks_its_instance_at_start_up_and_stays_token_exact(fake_metal, random_model, kernel):
    """Whatever the model's instance does in its check, greedy tokens equal mlx-lm's; the check
    ran when the engine started (before any graph was traced), not in a step."""
    model = random_model("llama", head_dim=64)
    kernels = {"wrong": lambda *a, **k: paged_attention_reference(*a, **k) * 1.1,
               "unbuildable": unbuildable, "correct": paged_attention_reference}
    calls = fake_metal(kernels[kernel])
    llm = LLM(str(model), num_blocks=64)
    assert list(metal_kernels._verdicts.values()) == [kernel == "correct"]
    assert len(calls) == (1 if kernel == "unbuildable" else 2)  # the check's cases, at start-up
    prompt = [5, 9, 200, 31, 7]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = llm.generate([prompt], params, use_tqdm=False)[0]
    oracle, _ = mlx_lm_load(str(model))
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), oracle, max_tokens=12)]
    assert ours.token_ids == expected
    assert (len(calls) > 2) == (kernel == "correct")  # only an instance that passed serves steps


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(head_dim=16), "head_dim 16"),
        (dict(head_dim=48), "head_dim 48"),
        (dict(block_size=4), "block_size 4"),
        (dict(q_heads=5, kv_heads=2), "5 query heads do not split over 2 KV heads"),
    ],
)
def test_unsupported_shapes_fall_back_with_one_debug_line(fake_metal, caplog, kwargs, reason):
    calls = fake_metal(paged_attention_reference)
    args = inputs(**kwargs)
    with caplog.at_level(logging.DEBUG, logger="pico_vllm.metal"):
        assert paged_attention_metal(*args) is None
        assert paged_attention_metal(*args) is None
    assert caplog.text.count(reason) == 1
    assert not calls


def test_metal_kernels_is_a_leaf_that_never_imports_the_engine():
    import subprocess
    import sys

    code = "import sys, metal_kernels; print(sorted(m for m in sys.modules if m.startswith('pico_vllm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_inputs_the_kernel_would_misread_fall_back(fake_metal):
    calls = fake_metal(paged_attention_reference)
    q, k_pool, v_pool, tables, lengths, scale = inputs()
    for bad in [(q, k_pool, v_pool.astype(mx.float16), tables, lengths, scale),
                (q, k_pool, v_pool, tables.astype(mx.int64), lengths, scale),
                (q, k_pool, v_pool, tables, lengths.astype(mx.uint32), scale)]:
        assert paged_attention_metal(*bad) is None
    assert not calls


def test_on_a_mac_the_engine_wires_the_recommended_working_set_as_mlx_lm_does(monkeypatch):
    from pico_vllm.engine import memory

    limits = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: limits.append(limit) or 0)
    monkeypatch.setattr(memory, "metal_available", lambda: False)  # as on Linux: untouched
    assert memory.wire_memory() is None and limits == []
    monkeypatch.setattr(memory, "metal_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 48 * 2**30})
    assert memory.wire_memory() == 48 * 2**30 and limits == [48 * 2**30]
