"""Run the exact Metal source MLX generates for our kernel on the CPU.

1. ``capture_msl``: MLX records ``mx.fast.metal_kernel`` calls while tracing
   ``mx.export_function`` even without a Metal device, and ``verbose=True`` makes it print the
   full generated kernel (signature + body + template instantiation).
2. ``build``: that source, after ``msl_shim.h``, plus a generated ``main`` that maps each
   ``[[buffer(i)]]`` parameter to a file and each attribute to the shim's thread coordinates,
   is compiled with ``g++ -std=c++20`` (optionally under ASan or TSan), cached by content hash.
3. ``run``: numpy buffers go to files, the program runs the grid, outputs come back.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent
CACHE = Path(tempfile.gettempdir()) / "pico_vllm_metal_sim"
SANITIZER_FLAGS = {
    None: ["-O2"],
    "address": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
# What each Metal attribute is, in the shim's per-thread lambda arguments.
ATTRIBUTES = {
    "thread_position_in_grid": "uint3{gp.x * tg.x + lid.x, gp.y * tg.y + lid.y, gp.z * tg.z + lid.z}",
    "thread_position_in_threadgroup": "lid",
    "threadgroup_position_in_grid": "gp",
    "threadgroups_per_grid": "ngroups",
    "threads_per_threadgroup": "size",
    "thread_index_in_threadgroup": "index",
    "simdgroup_index_in_threadgroup": "simdgroup",
    "thread_index_in_simdgroup": "index % 32",
    "threads_per_simdgroup": "32u",
    "simdgroups_per_threadgroup": "nsimd",
    "threads_per_grid": "grid",
}
PARAM = re.compile(r"^\s+(?P<type>.*?)\s*(?P<name>\w+) \[\[(?P<attr>\w+)(?:\((?P<index>\d+)\))?\]\]", re.M)


@dataclass
class Kernel:
    msl: str
    params: list[tuple[str, str, str, int | None]]  # (type, name, attribute, buffer index)
    binary: Path


def capture_msl(kernel_call, *args: mx.array) -> str:
    """The Metal source MLX generates when ``kernel_call(*args)`` runs the kernel verbosely."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "stdout"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        saved = os.dup(1)
        sys.stdout.flush()
        os.dup2(fd, 1)  # MLX prints from C++: capture the file descriptor, not sys.stdout
        try:
            mx.export_function(str(Path(tmp) / "trace.mlxfn"), kernel_call, *args)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(fd)
            os.close(saved)
        text = log.read_text()
    return text.split("```\n", 1)[1].rsplit("```", 1)[0]


def build(msl: str, sanitizer: str | None = None) -> Kernel:
    """Compile ``msl`` over the shim into a program (cached by source + flags)."""
    signature = msl[msl.index("[[kernel]] void ") : msl.index(") {")]
    params = [
        (m["type"], m["name"], m["attr"], int(m["index"]) if m["index"] else None)
        for m in PARAM.finditer(signature)
    ]
    instance = re.search(r"decltype\((\w+<[^>]*>)\)", msl).group(1)
    args = []
    for type_, _, attr, index in params:
        if attr != "buffer":
            args.append(ATTRIBUTES[attr])
            continue
        base = re.sub(r"\b(const|device|constant)\b", "", type_).strip()
        if base.endswith("&"):  # a scalar passed by reference (e.g. `const constant float& scale`)
            args.append(f"*({base[:-1].strip()}*)buffers[{index}]")
        else:
            args.append(f"({base})buffers[{index}]")
    num_buffers = 1 + max(i for *_, i in params if i is not None)
    source = f"""#include "msl_shim.h"
#include <cstdio>
#include <cstdlib>
{msl}
// Usage: prog DIR  (DIR/launch.txt: gx gy gz tx ty tz; DIR/buf_<i>.bin for each buffer)
int main(int argc, char** argv) {{
  const std::string dir = argv[1];
  unsigned g[3], t[3];
  FILE* f = std::fopen((dir + "/launch.txt").c_str(), "r");
  if (!f || std::fscanf(f, "%u %u %u %u %u %u", g, g + 1, g + 2, t, t + 1, t + 2) != 6) return 2;
  std::fclose(f);
  std::vector<std::vector<char>> data({num_buffers});
  void* buffers[{num_buffers}];
  for (int i = 0; i < {num_buffers}; i++) {{
    FILE* b = std::fopen((dir + "/buf_" + std::to_string(i) + ".bin").c_str(), "rb");
    if (!b) return 3;
    std::fseek(b, 0, SEEK_END);
    data[i].resize(std::ftell(b));
    std::fseek(b, 0, SEEK_SET);
    if (std::fread(data[i].data(), 1, data[i].size(), b) != data[i].size()) return 4;
    std::fclose(b);
    buffers[i] = data[i].data();
  }}
  const uint3 grid{{g[0], g[1], g[2]}};
  mslsim::run_grid(grid, uint3{{t[0], t[1], t[2]}},
      [&](uint3 lid, uint3 gp, uint3 ngroups, uint3 size, uint3 tg, uint index, uint simdgroup,
          uint nsimd) {{
        {instance}({", ".join(args)});
      }});
  for (int i = 0; i < {num_buffers}; i++) {{
    FILE* b = std::fopen((dir + "/buf_" + std::to_string(i) + ".bin").c_str(), "wb");
    std::fwrite(data[i].data(), 1, data[i].size(), b);
    std::fclose(b);
  }}
  return 0;
}}
"""
    flags = SANITIZER_FLAGS[sanitizer]
    digest = hashlib.sha1((source + " ".join(flags)).encode()).hexdigest()[:16]
    CACHE.mkdir(exist_ok=True)
    binary = CACHE / f"kernel_{digest}"
    if not binary.exists():
        cpp = CACHE / f"kernel_{digest}.cpp"
        cpp.write_text(source)
        command = ["g++", "-std=c++20", "-w", *flags, "-I", str(HERE), str(cpp), "-o",
                   str(binary) + ".tmp", "-lpthread"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(str(binary) + ".tmp", binary)
    return Kernel(msl, params, binary)


def run(
    kernel: Kernel,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    grid: tuple[int, int, int],
    threadgroup: tuple[int, int, int],
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the program on numpy buffers; ``outputs`` are overwritten with the results."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "launch.txt").write_text(" ".join(map(str, (*grid, *threadgroup))))
        for _, name, attr, index in kernel.params:
            if attr == "buffer":
                _buffer(name, inputs, outputs).tofile(tmp_path / f"buf_{index}.bin")
        result = subprocess.run(
            [str(kernel.binary), tmp], capture_output=True, text=True,
            env={**os.environ, "LD_PRELOAD": "", **(env or {})},
        )
        if result.returncode == 0:
            for _, name, attr, index in kernel.params:
                if attr == "buffer" and name in outputs:
                    out = outputs[name]
                    out[...] = np.fromfile(tmp_path / f"buf_{index}.bin", out.dtype).reshape(out.shape)
    return result


def _storage(a: np.ndarray) -> np.ndarray:
    """The memory MLX would hand the kernel: the array itself, or for a view (read through its
    ``_strides``) the contiguous array it views, which must start where the view does."""
    if a.flags.c_contiguous:
        return a
    base = a.base
    assert base is not None and base.flags.c_contiguous, "a view of a contiguous array, please"
    assert a.__array_interface__["data"][0] == base.__array_interface__["data"][0], "view at offset 0"
    return base


def _buffer(name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The array behind a buffer parameter, MLX's generated ``<input>_shape`` etc. included."""
    if name in inputs:
        return _storage(inputs[name])
    if name in outputs:
        return outputs[name]
    for suffix, make in (
        ("_shape", lambda a: np.array(a.shape, np.int32)),
        ("_strides", lambda a: np.array([s // a.itemsize for s in a.strides], np.int64)),
        ("_ndim", lambda a: np.array(a.ndim, np.int32)),
    ):
        if name.endswith(suffix) and name[: -len(suffix)] in inputs:
            return make(inputs[name[: -len(suffix)]])
    raise KeyError(f"no buffer for kernel parameter {name!r}")
