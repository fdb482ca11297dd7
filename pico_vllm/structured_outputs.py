"""Structured outputs: a request's tokens held to a JSON schema, a regex, a choice or a grammar.

The grammar engine is llguidance. A request's constraint compiles (once per distinct grammar:
the compiled matcher is cached and copied) into an ``LLMatcher`` that follows the request's
tokens. Before each of the request's steps, the matcher computes the set of tokens that keep the
output inside the grammar, as a bitmask (one bit per vocabulary id); the sampler masks every other
token's logit to ``-inf`` (a stage of its own, for the constrained rows of the batch). When the
grammar is complete, the matcher stops the request: the output parses by construction, unless
``max_tokens`` cut it first (``finish_reason: "length"``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# JSON on one line, as json.dumps writes it: with free whitespace a small model can indent and
# newline its way to max_tokens (a schema's own "x-guidance" options override this).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputsParams:
    """One constraint per request (vLLM's ``StructuredOutputsParams``).

    Attributes:
        json: a JSON schema (a dict, or its text): the output is a JSON value that validates.
        regex: the output matches this regular expression, whole.
        choice: the output is exactly one of these strings.
        grammar: a Lark grammar in llguidance's dialect (``start: ...``).
        json_object: the output is a JSON object, any object (OpenAI's ``json_object``).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"json: the schema is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"json: a schema is a JSON object, got {type(self.json).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex must be a string, got {type(self.regex).__name__}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a string, got {type(self.grammar).__name__}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")

    @property
    def kind(self) -> str:
        """Which constraint this is (one of ``KINDS``): error messages name it."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def grammar_source(self) -> str:
        """The constraint as an llguidance grammar."""
        from llguidance import LLMatcher

        if self.json is not None or self.json_object:
            schema = {"type": "object"} if self.json_object else self.json
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            except ValueError as e:
                raise ValueError(f"{self.kind}: {e}") from None
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            alternatives = " | ".join(json.dumps(c) for c in self.choice)  # Lark string literals
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return LLMatcher.grammar_from_lark(self.grammar)


def as_structured_outputs(value: StructuredOutputsParams | dict | None) -> StructuredOutputsParams | None:
    """``SamplingParams(structured_outputs=...)`` takes the dataclass or its fields as a dict."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        unknown = set(value) - set(KINDS)
        if unknown:
            raise ValueError(f"structured_outputs: unknown field(s) {sorted(unknown)}; "
                             f"one of {', '.join(KINDS)}")
        return StructuredOutputsParams(**value)
    raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got "
                     f"{type(value).__name__}")


class GrammarCompiler:
    """One engine's grammars: llguidance's view of the tokenizer (built on first use: ~0.3 s
    for a 49k vocabulary) and the compiled matchers, one per distinct grammar, copied per request.

    ``tokenizer`` is a Hugging Face fast tokenizer (or mlx-lm's wrapper of one): llguidance reads
    its Rust tokenizer's JSON; ``vocab_size`` is the model's (its logits may be wider than the
    tokenizer's vocabulary: those ids are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int) -> None:
        self._hf_tokenizer, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self._tokenizer = None
        self._compiled: dict[str, object] = {}

    def _llguidance_tokenizer(self):
        from copy import copy

        from llguidance import LLTokenizer

        if self._tokenizer is None:
            backend = copy(self._hf_tokenizer.backend_tokenizer)
            backend.no_padding()
            backend.no_truncation()
            self._tokenizer = LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                          eos_token=self.eos_token_id)
        return self._tokenizer

    def matcher(self, params: StructuredOutputsParams):
        """A fresh ``LLMatcher`` for ``params``; ValueError (naming the kind) if it does not compile."""
        from llguidance import LLMatcher

        source = params.grammar_source()
        if source not in self._compiled:
            tokenizer = self._llguidance_tokenizer()
            error = LLMatcher.validate_grammar(source, tokenizer)
            if error:
                raise ValueError(f"{params.kind}: {_one_line(error)}")
            matcher = LLMatcher(tokenizer, source, log_level=0)
            if matcher.is_error():
                raise ValueError(f"{params.kind}: {matcher.get_error()}")
            self._compiled[source] = matcher
        return self._compiled[source].deep_copy()


def _one_line(error: str) -> str:
    """llguidance's error, without the source excerpts and carets it draws under them."""
    lines = [line.strip() for line in error.splitlines()]
    kept = [line for line in lines if line and set(line) != {"^"} and not re.match(r"\d+ \|", line)
            and not line.startswith("|")]
    return " ".join(kept)


def token_bitmask(matchers: list[tuple[object, int]], batch: int, vocab_size: int) -> np.ndarray:
    """``[batch, ceil(vocab / 32)]`` int32 bitmask: row ``i`` of each ``(matcher, i)`` holds the
    tokens its grammar allows next; every other row allows everything."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    bitmask = allocate_token_bitmask(batch, vocab_size)  # all bits set
    for matcher, row in matchers:
        fill_next_token_bitmask(matcher, bitmask, row)
    return bitmask
