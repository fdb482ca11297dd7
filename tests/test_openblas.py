"""Linux: the Python API runs MLX on Debian's OpenBLAS without LD_PRELOAD (``pico_vllm.openblas``).

Whether a process's GEMMs run on OpenBLAS is told by their bits: the wheel's reference BLAS and
OpenBLAS sum in different orders, so the same random fp32 GEMM gives different results; a
process is on OpenBLAS when its result is bitwise the LD_PRELOAD process's."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from pico_vllm import openblas

LIBRARY = next((p for p in openblas.OPENBLAS_PATHS if os.path.exists(p)), None)
needs_openblas = pytest.mark.skipif(LIBRARY is None or sys.platform != "linux",
                                    reason="Debian's OpenBLAS is not installed (CI installs it)")
GEMM = ("import hashlib, numpy as np, mlx.core as mx\n"
        "a = mx.random.normal((256, 512), key=mx.random.key(0))\n"
        "b = mx.random.normal((512, 256), key=mx.random.key(1))\n"
        "print('GEMM', hashlib.sha1(np.array(a @ b).tobytes()).hexdigest())\n")


def gemm_digest(prelude: str, **env: str) -> tuple[str, str]:
    """(digest of the GEMM, stderr) in a fresh process without LD_PRELOAD, after ``prelude``."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", openblas.NO_OPENBLAS_ENV)}
    out = subprocess.run([sys.executable, "-c", prelude + "\n" + GEMM], capture_output=True, text=True,
                         env=clean | env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("GEMM ")[1].strip(), out.stderr


@needs_openblas
def test_importing_pico_vllm_first_puts_mlx_on_openblas_and_later_mlx_imports_cannot():
    reference, _ = gemm_digest("")
    preloaded, _ = gemm_digest("", LD_PRELOAD=LIBRARY)
    assert preloaded != reference  # the check can tell the two libraries apart
    api, err = gemm_digest("from pico_vllm import LLM, SamplingParams")  # the README's first line
    assert api == preloaded and "pico-vllm:" not in err
    late, err = gemm_digest("import mlx.core\nimport pico_vllm")
    assert late == reference
    assert "mlx was imported before pico_vllm" in err and "import pico_vllm first" in err
    assert f"LD_PRELOAD={LIBRARY}" in err
    opted_out, err = gemm_digest("import pico_vllm", **{openblas.NO_OPENBLAS_ENV: "1"})
    assert opted_out == reference and "pico-vllm:" not in err


def test_a_machine_without_openblas_is_told_how_to_install_it(monkeypatch, caplog):
    monkeypatch.setattr(openblas, "OPENBLAS_PATHS", ("/nonexistent/libopenblas.so.0",))
    monkeypatch.setattr(openblas, "openblas_loaded", lambda: False)
    monkeypatch.delenv(openblas.NO_OPENBLAS_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="pico_vllm"):
        assert openblas.use_openblas("linux") == "missing"
    assert "apt-get install libopenblas0-pthread" in caplog.text
    assert openblas.use_openblas("darwin") == "not-linux"  # Metal: nothing to do, nothing said
