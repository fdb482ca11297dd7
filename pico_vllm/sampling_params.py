"""Per-request sampling parameters, validated on construction (mirrors ``vllm.SamplingParams``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from pico_vllm.structured_outputs import StructuredOutputsParams, as_structured_outputs


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops.

    Attributes:
        temperature: 0 means greedy; higher flattens the distribution.
        top_p: keep the smallest set of tokens whose probability sums to ``top_p`` (1 = off).
        top_k: keep the ``top_k`` most likely tokens (0 = off).
        min_p: drop tokens less likely than ``min_p`` times the most likely one (0 = off).
        repetition_penalty: divide positive (multiply negative) logits of every token seen in
            the prompt or output (1 = off).
        presence_penalty: subtract from the logits of tokens already in the output (0 = off).
        frequency_penalty: subtract, per occurrence, from tokens in the output (0 = off).
        max_tokens: most tokens to generate.
        min_tokens: EOS and ``stop_token_ids`` are blocked until this many are generated.
        stop: strings that end generation; they are cut from the returned text.
        stop_token_ids: token ids that end generation (kept in ``token_ids``).
        ignore_eos: keep generating past the tokenizer's EOS tokens.
        seed: makes this request's sampling reproducible, whatever else is in the batch.
        logprobs: also return the log-probabilities of this many most likely tokens per step
            (plus the sampled one); ``None`` returns none.
        structured_outputs: hold the output to a JSON schema, a regex, a choice or a grammar
            (a ``StructuredOutputsParams`` or its fields as a dict; see ``structured_outputs.py``).
        prediction: the output the caller expects, as text or token ids (OpenAI's Predicted
            Outputs): its tokens are drafted and verified as in speculative decoding, so a good
            prediction takes several tokens per step; the output is the same with or without it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | dict | None = None
    prediction: str | list[int] | None = None

    def __post_init__(self) -> None:
        self.structured_outputs = as_structured_outputs(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) for s in self.stop
        ):
            raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        self.stop = list(self.stop)
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}"
            )
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in _FLOAT_FIELDS:  # a string or None would otherwise fail with a TypeError
            value = getattr(self, name)
            _check(isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value),
                   name, "a finite number", value)
        _check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", ">= 0 (0 = off)", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]",
               self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]",
               self.frequency_penalty)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", ">= 1",
               self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", "in [0, max_tokens]", self.min_tokens)
        _check(self.seed is None or _is_int(self.seed), "seed", "an int or None", self.seed)
        _check(self.prediction is None or isinstance(self.prediction, str)
               or (isinstance(self.prediction, (list, tuple)) and all(_is_int(t) for t in self.prediction)),
               "prediction", "a str, a list of token ids or None", self.prediction)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)
        # Plain Python numbers from here on, even when given numpy scalars.
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        for name in ("top_k", "max_tokens", "min_tokens", "seed", "logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)  # True is an int in Python


MAX_LOGPROBS = 20  # top-n per token, as vLLM's default max_logprobs

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
