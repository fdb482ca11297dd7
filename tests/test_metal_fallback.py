"""The kernel's guard rails, run on Linux by simulating Metal: availability, unsupported shapes,
and the self-check that switches a process to the reference when the kernel is wrong."""

from __future__ import annotations

import logging

import mlx.core as mx
import pytest

import metal_kernels
from metal_kernels import paged_attention, paged_attention_metal, paged_attention_reference


def inputs(head_dim=64, block_size=16, dtype=mx.float32):
    q = mx.random.normal((2, 4, head_dim)).astype(dtype)
    pool = mx.random.normal((2, 8, block_size, head_dim)).astype(dtype)
    tables = mx.array([[0, 1, 2], [5, 4, 0]], dtype=mx.int32)
    return q, pool, pool * 0.5, tables, mx.array([40, 20], dtype=mx.int32), head_dim**-0.5


@pytest.fixture
def fake_metal(monkeypatch):
    """Pretend to be on a Mac, with a 'kernel' we control."""
    monkeypatch.setattr(metal_kernels, "metal_available", lambda: True)
    monkeypatch.setattr(metal_kernels, "_self_check", {})
    monkeypatch.setattr(metal_kernels, "_reported", set())
    calls = []

    def set_kernel(fn):
        def kernel(*args):
            calls.append(args)
            return fn(*args)

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
    assert len(calls) == 2  # the self-check, then the real call
    paged_attention_metal(*args)
    assert len(calls) == 3  # the check runs once per process


def test_a_wrong_kernel_fails_the_self_check_and_the_reference_takes_over(fake_metal, caplog):
    calls = fake_metal(lambda *a: paged_attention_reference(*a) + 0.01)
    args = inputs()
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*args) is None
        assert paged_attention_metal(*args) is None
    assert "failed its self-check" in caplog.text
    assert len(calls) == 1  # never called again after the failed check
    assert mx.array_equal(paged_attention(*args), paged_attention_reference(*args))


def test_a_crashing_kernel_fails_the_self_check(fake_metal, caplog):
    def crash(*_):
        raise RuntimeError("Unable to build pipeline")

    fake_metal(crash)
    with caplog.at_level(logging.WARNING, logger="pico_vllm.metal"):
        assert paged_attention_metal(*inputs()) is None
    assert "Unable to build pipeline" in caplog.text


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(head_dim=16), "head_dim 16"),
        (dict(head_dim=48), "head_dim 48"),
        (dict(block_size=4), "block_size 4"),
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
