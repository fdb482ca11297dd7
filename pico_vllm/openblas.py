"""Linux: MLX's CPU matmuls on Debian's OpenBLAS, for every way pico-vllm is used.

The ``mlx[cpu]`` wheel links a reference BLAS: a 1024x1024 fp32 GEMM runs at ~4 GFLOP/s on the
2-core CI box, against 150-170 with Debian's OpenBLAS (``apt-get install libopenblas0-pthread``).
MLX resolves its BLAS symbols when ``mlx.core`` is loaded, looking in the process's global scope
first, so loading OpenBLAS into that scope (``RTLD_GLOBAL``) *before* MLX is imported has the same
effect as ``LD_PRELOAD`` (measured: bitwise the same GEMM results, the same speed). ``pico_vllm`` does
this as its very first import; when MLX was imported earlier it is too late, and a warning names
the fix. Standard library only: the CLI imports this without MLX.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

OPENBLAS_PATHS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0")
NO_OPENBLAS_ENV = "PICO_VLLM_NO_OPENBLAS"  # set to 1 to keep the wheel's BLAS (and no warning)
INSTALL_HINT = "apt-get install libopenblas0-pthread"

log = logging.getLogger("pico_vllm")


def openblas_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether an OpenBLAS library is mapped into this process (preloaded or loaded)."""
    try:
        return "libopenblas" in maps.read_text()
    except OSError:
        return False


def use_openblas(platform: str = sys.platform) -> str:
    """Load Debian's OpenBLAS for MLX when it applies; returns what happened: ``"loaded"``,
    ``"already"`` (preloaded), ``"too-late"`` (MLX was imported first: warned), ``"missing"``
    (not installed: warned), ``"off"`` (``PICO_VLLM_NO_OPENBLAS``) or ``"not-linux"``."""
    if platform != "linux":
        return "not-linux"
    if os.environ.get(NO_OPENBLAS_ENV, "") not in ("", "0"):
        return "off"
    if openblas_loaded():
        return "already"
    path = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
    if path is None:
        log.warning("pico-vllm: Debian's OpenBLAS is not installed, so MLX's fp32 matmuls run ~20x "
                    "slower (%s; %s=1 hides this)", INSTALL_HINT, NO_OPENBLAS_ENV)
        return "missing"
    if "mlx.core" in sys.modules:
        log.warning("pico-vllm: mlx was imported before pico_vllm, so MLX keeps its slow reference "
                    "BLAS (~20x slower fp32 matmuls): import pico_vllm first, or run with "
                    "LD_PRELOAD=%s (%s=1 hides this)", path, NO_OPENBLAS_ENV)
        return "too-late"
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return "loaded"
