"""What g++ accepts but Metal rejects, and threadgroup memory per instantiated template: static
checks over the .metal sources (the CPU emulation cannot see either)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metal_kernels.kernel import (
    HEAD_DIMS,
    NUM_SIMDGROUPS,
    THREADGROUP_MEMORY_LIMIT,
    heads_per_threadgroup,
    threadgroup_bytes,
)

METAL_FILES = sorted((Path(__file__).parents[2] / "metal_kernels").glob("*.metal"))
TEMPLATE_NAMES = {"D", "BS", "GQ", "NSG"}
GQA_GROUPS = (1, 2, 3, 4, 6, 7, 8, 16)


def code_of(path: Path) -> str:
    """The source without comments."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def lint(code: str) -> list[str]:
    problems = []
    for number, line in enumerate(code.splitlines(), 1):
        if not line.isascii():
            problems.append(f"non-ASCII character on line {number} (MLX hands Metal the source as ASCII)")
    if re.search(r"\bdouble\b", code):
        problems.append("double (Metal has no 64-bit float)")
    if "std::" in code:
        problems.append("std:: (Metal has no C++ standard library)")
    for match in re.finditer(r"([\w:]+)\s*\*\s*\w+\s*=", code):
        line = code[code.rfind("\n", 0, match.start()) + 1 : match.end()]
        if not re.search(r"\b(device|threadgroup|constant|thread)\b", line):
            problems.append(f"pointer without an address space: {line.strip()}")
    for match in re.finditer(r"threadgroup\s+\w+\s+\w+\[([^\]]+)\]", code):
        names = set(re.findall(r"[A-Za-z_]\w*", match.group(1)))
        if names - TEMPLATE_NAMES:
            problems.append(f"threadgroup array sized at run time: {match.group(0)}")
    return problems


def threadgroup_arrays(code: str) -> list[tuple[str, str]]:
    """(element type, size expression) of every threadgroup array."""
    return re.findall(r"threadgroup\s+(\w+)\s+\w+\[([^\]]+)\];", code)


@pytest.mark.parametrize("path", METAL_FILES, ids=lambda p: p.name)
def test_metal_source_passes_lint(path):
    assert len(METAL_FILES) == 2, "pass 1 and pass 2 should both be linted"
    assert lint(code_of(path)) == []
    assert path.read_text().isascii(), "comments too: MLX passes the whole source on"


@pytest.mark.parametrize(
    "snippet,problem",
    [
        ("double x = 1.0;", "double"),
        ("float y = std::exp(1.0f);", "std::"),
        ("float* p = &x;", "pointer without an address space"),
        ("threadgroup float buf[n * D];", "sized at run time"),
        ("const float x = 1.0f;  \u2014 em dash", "non-ASCII"),
    ],
)
def test_lint_catches_what_metal_rejects(snippet, problem):
    assert any(problem in p for p in lint(snippet))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA_GROUPS)
def test_threadgroup_memory_and_registers_fit_every_instance(head_dim, group):
    """The arrays declared in the source, evaluated for each template instance the launcher
    picks, stay within 32 KB and agree with the launcher's own accounting; a lane's q and o
    registers stay within the cap however many query heads share a KV head."""
    gq = heads_per_threadgroup(group, head_dim)
    assert group % gq == 0 and gq * -(-head_dim // 32) <= 32
    values = {"D": head_dim, "GQ": gq, "NSG": NUM_SIMDGROUPS, "BS": 32}
    sizes = {"float": 4, "half": 2, "int": 4, "uint": 4}
    total = 0
    for path in METAL_FILES:
        for element, expression in threadgroup_arrays(code_of(path)):
            total += sizes[element] * eval(expression, {}, values)  # template arithmetic only
    assert total <= THREADGROUP_MEMORY_LIMIT
    assert total == threadgroup_bytes(head_dim)
