"""Fifty JSON schemas of the shapes applications ask for: nested objects, arrays with bounds,
enums, numbers with ranges, optional fields, string formats and patterns. Deterministic: built
from a seeded generator, each with a name the tests can report."""

from __future__ import annotations

import random

FORMATS = ["date", "time", "date-time", "email", "uuid", "ipv4"]
WORDS = ["name", "city", "title", "status", "score", "count", "tags", "owner", "price", "items", "id",
         "level", "note", "kind", "rating"]


def _leaf(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "format", "pattern", "array",
                       "object" if depth < 2 else "string"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([8, 16, 32])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice([1, 10, 1000])}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 100, 1e6])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no", "maybe"], 3)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[A-Z]{2}-\d{3}$", r"^[a-z]+$", r"^\d{4}$"])}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _leaf(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(1, 3)}
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 4))
    properties = {name: _leaf(rng, depth) for name in names}
    required = [name for name in names if rng.random() < 0.7]  # the rest are optional
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def schemas(count: int = 50, seed: int = 0) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        top = rng.choice(["object", "object", "object", "array"])
        schema = _object(rng, 0) if top == "object" else {
            "type": "array", "items": _object(rng, 1), "minItems": 1, "maxItems": 3}
        out.append((f"schema{i:02d}-{top}", schema))
    return out
