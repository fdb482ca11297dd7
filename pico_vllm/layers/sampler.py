"""Batched sampling: every row of the logits follows its own request's ``SamplingParams``.

The pipeline, each stage vectorized over the batch:
penalties -> min_tokens (block EOS / stop tokens) -> temperature -> top-k / top-p / min-p
truncation -> draw (Gumbel-max with a per-row key) -> logprobs of the raw distribution.
An all-greedy batch without penalties is a single argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from pico_vllm.sampling_params import SamplingParams


class SamplingRequest(Protocol):
    """What the sampler reads of a sequence (the engine's ``Sequence`` satisfies it)."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def num_output_tokens(self) -> int: ...


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each sampled token; None if no row asked
    top_logprobs: list[list[tuple[int, float]] | None]  # top-n (id, logprob) where asked


class Sampler:
    """Samples one token per row of ``logits[B, V]`` (float32)."""

    def __init__(self, eos_token_ids: set[int], seed: int = 0) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self._key = mx.random.key(seed)  # for requests without a seed of their own

    def __call__(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> SamplerOutput:
        params = [r.params for r in requests]
        raw = logits
        logits = self._apply_penalties(logits, requests)
        logits = self._block_stop_tokens(logits, requests)
        greedy = mx.argmax(logits, axis=-1)
        if all(p.greedy for p in params):
            tokens = greedy
        else:
            is_greedy = mx.array([p.greedy for p in params])
            tokens = mx.where(is_greedy, greedy, self._draw(logits, requests))
        token_list = tokens.tolist()
        return self._with_logprobs(raw, token_list, params)

    def _apply_penalties(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> mx.array:
        rows = [i for i, r in enumerate(requests) if _has_penalty(r.params)]
        if not rows:
            return logits
        vocab = logits.shape[-1]
        seen = np.zeros((len(rows), vocab), dtype=bool)  # in prompt or output
        counts = np.zeros((len(rows), vocab), dtype=np.float32)  # occurrences in the output
        for k, i in enumerate(rows):
            seen[k, requests[i].token_ids] = True
            np.add.at(counts[k], requests[i].output_token_ids, 1)
        p = [requests[i].params for i in rows]
        repetition = mx.array([x.repetition_penalty for x in p])[:, None]
        presence = mx.array([x.presence_penalty for x in p])[:, None]
        frequency = mx.array([x.frequency_penalty for x in p])[:, None]
        index = mx.array(rows)
        sub, seen_m, counts_m = logits[index], mx.array(seen), mx.array(counts)
        # HF repetition penalty: shrink seen tokens' logits toward "less likely" on either sign.
        sub = mx.where(seen_m, mx.where(sub > 0, sub / repetition, sub * repetition), sub)
        # OpenAI penalties: a flat one per token present in the output, plus one per occurrence.
        sub = sub - presence * (counts_m > 0) - frequency * counts_m
        logits = mx.array(logits)
        logits[index] = sub
        return logits

    def _block_stop_tokens(self, logits: mx.array, requests: Sequence[SamplingRequest]):
        """Until ``min_tokens`` are out, EOS and ``stop_token_ids`` cannot be sampled."""
        rows, cols = [], []
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    stops.update(self.eos_token_ids)
                rows += [i] * len(stops)
                cols += sorted(stops)
        if not rows:
            return logits
        logits = mx.array(logits)
        logits[mx.array(rows), mx.array(cols)] = -mx.inf
        return logits

    def _draw(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> mx.array:
        """Sample each row from its tempered, truncated distribution."""
        params = [r.params for r in requests]
        temperature = mx.array([p.temperature if p.temperature > 0 else 1.0 for p in params])
        order = mx.argsort(-logits, axis=-1)  # truncation works on tokens sorted by probability
        sorted_logits = mx.take_along_axis(logits, order, axis=-1) / temperature[:, None]
        probs = mx.softmax(sorted_logits, axis=-1)
        rank = mx.arange(logits.shape[-1])[None, :]
        top_k = mx.array([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params])
        top_p = mx.array([p.top_p for p in params])
        min_p = mx.array([p.min_p for p in params])
        keep = rank < top_k[:, None]
        # top-p: keep a token if the mass strictly before it is still short of top_p.
        keep &= (mx.cumsum(probs, axis=-1) - probs) < top_p[:, None]
        keep &= probs >= min_p[:, None] * probs[:, :1]
        keep |= rank == 0  # the most likely token always survives
        noise = mx.stack([mx.random.gumbel((logits.shape[-1],), key=k) for k in self._keys(requests)])
        choice = mx.argmax(mx.where(keep, sorted_logits + noise, -mx.inf), axis=-1)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

    def _keys(self, requests: Sequence[SamplingRequest]) -> list[mx.array]:
        """A seeded request's key depends only on (seed, tokens generated so far), so its
        samples do not depend on what else shares the batch."""
        self._key, step_key = mx.random.split(self._key)
        shared = mx.random.split(step_key, len(requests))
        return [
            mx.random.key((r.params.seed * 1_000_003 + r.num_output_tokens) % 2**63)
            if r.params.seed is not None
            else shared[i]
            for i, r in enumerate(requests)
        ]

    def _with_logprobs(self, raw: mx.array, tokens: list[int], params: list[SamplingParams]):
        wanted = [p.logprobs for p in params]
        if all(n is None for n in wanted):
            return SamplerOutput(tokens, None, [None] * len(tokens))
        # vLLM semantics: log-softmax of the model's own logits (before penalties/temperature).
        logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, mx.array(tokens)[:, None], axis=-1)[:, 0].tolist()
        n_max = max(n for n in wanted if n is not None)
        top_ids = mx.argsort(-logprobs, axis=-1)[:, :n_max]
        top_ids_list = top_ids.tolist()
        top_lps = mx.take_along_axis(logprobs, top_ids, axis=-1).tolist()
        top = [
            None if n is None else list(zip(top_ids_list[i][:n], top_lps[i][:n]))
            for i, n in enumerate(wanted)
        ]
        return SamplerOutput(tokens, chosen, top)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
