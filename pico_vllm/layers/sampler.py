"""Batched sampling: every row of the logits follows its own request's ``SamplingParams``.

One step is a short pipeline, each stage vectorized over the batch with ``[B]``-shaped
parameter arrays (rows that do not use a stage pass through it unchanged):

    penalties -> grammar (structured outputs) -> block stop tokens (min_tokens) -> greedy argmax
                                      -> temperature -> min-p -> top-k/top-p -> draw

The first three are :class:`LogitsStage` s (``Sampler.stages``): each says which rows it changes,
and whether it reads earlier token ids on the host. That is what decides the shortcuts: a batch
no stage touches, all greedy and without logprobs, is the model's plain argmax (computed inside a
captured decode graph), and a step whose stages read token ids waits for the previous step's ids.

The draw is Gumbel-max, ``argmax(logits + Gumbel noise)``, an exact sample from
``softmax(logits)`` whose randomness is one noise row per request, so a seeded request gets
its own noise whatever else shares the batch. Logprobs are those of the raw model logits.
An all-greedy batch without penalties or logprobs is a single argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, Protocol

import mlx.core as mx
import numpy as np

from pico_vllm.sampling_params import SamplingParams
from pico_vllm.structured_outputs import token_bitmask


class SamplingRequest(Protocol):
    """What the sampler reads of a sequence (the engine's ``Sequence`` satisfies it)."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    grammar: object | None  # llguidance matcher of a structured output, at the next token

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def num_output_tokens(self) -> int: ...


@dataclass
class SamplerOutput:
    """One sampled token per row, with logprobs for the rows that asked."""

    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each sampled token; None if no row asked
    top_logprobs: list[list[tuple[int, float]] | None]  # top-n (id, logprob) where asked


class PendingSamples(NamedTuple):
    """A step's samples as unevaluated arrays; ``resolve`` is the one place they reach the host
    (the step's sync point)."""

    token_ids: mx.array  # [B]
    wanted: list[int | None]  # each row's requested number of top logprobs
    logprobs: mx.array | None = None  # [B], when a row asked
    top_ids: mx.array | None = None  # [B, n_max]
    top_values: mx.array | None = None

    def resolve(self) -> SamplerOutput:
        tokens = self.token_ids.tolist()
        if self.logprobs is None:
            return SamplerOutput(tokens, None, [None] * len(tokens))
        ids, values = self.top_ids.tolist(), self.top_values.tolist()
        top = [
            None if n is None else list(zip(ids[i][:n], values[i][:n]))
            for i, n in enumerate(self.wanted)
        ]
        return SamplerOutput(tokens, self.logprobs.tolist(), top)


@dataclass(frozen=True)
class LogitsStage:
    """One change to the logits before the draw. ``applies`` names the rows it changes: every
    other row passes bit-exact (and a batch with no such row skips the stage)."""

    name: str
    applies: Callable[[SamplingRequest], bool]
    apply: Callable[[mx.array, Sequence[SamplingRequest]], mx.array]
    reads_token_ids: bool  # needs the ids of the row's earlier tokens on the host


class Sampler:
    """Samples one token per row of ``logits[B, V]`` (float32), row ``i`` by ``requests[i]``."""

    def __init__(self, eos_token_ids: set[int], seed: int = 0) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self._key = mx.random.key(seed)  # the generator of requests without a seed
        self.stages = (
            # Penalties count the tokens so far; a grammar must have followed them.
            LogitsStage("penalties", lambda r: _has_penalty(r.params), self._apply_penalties, True),
            LogitsStage("grammar", lambda r: r.grammar is not None, _apply_grammars, True),
            LogitsStage("min_tokens", lambda r: r.num_output_tokens < r.params.min_tokens,
                        self._block_stop_tokens, False),
        )

    def sample(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> PendingSamples:
        """Build the sampling graph; nothing is evaluated until ``resolve``."""
        if logits.ndim != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits must have shape [len(requests)={len(requests)}, vocab], "
                f"got {tuple(logits.shape)}"
            )
        params = [r.params for r in requests]
        raw = logits
        for stage in self.stages:
            if any(stage.applies(r) for r in requests):
                logits = stage.apply(logits, requests)
        tokens = mx.argmax(logits, axis=-1)
        if not all(p.greedy for p in params):
            is_greedy = mx.array([p.greedy for p in params])
            tokens = mx.where(is_greedy, tokens, self._draw(logits, requests))
        return _with_logprobs(raw, tokens, params)

    def reads_token_ids(self, request: SamplingRequest) -> bool:
        """Whether sampling for ``request`` reads the ids of its earlier tokens on the host."""
        return any(stage.reads_token_ids and stage.applies(request) for stage in self.stages)

    def is_plain_argmax(self, requests: Sequence[SamplingRequest]) -> bool:
        """True when every row's token is just the argmax of the model's logits: greedy, no
        logprobs, and no stage changes its logits."""
        return all(
            r.params.greedy and r.params.logprobs is None
            and not any(stage.applies(r) for stage in self.stages)
            for r in requests
        )

    def _apply_penalties(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> mx.array:
        """Repetition (HF) over prompt + output, presence and frequency (OpenAI) over output."""
        penalized = [i for i, r in enumerate(requests) if _has_penalty(r.params)]
        in_context = _occurrences(logits.shape, penalized, [requests[i].token_ids for i in penalized]) > 0
        in_output = _occurrences(logits.shape, penalized, [requests[i].output_token_ids for i in penalized])
        # Rows without penalties get the neutral values (1, 0, 0): exactly unchanged.
        repetition = _column([r.params.repetition_penalty for r in requests])
        presence = _column([r.params.presence_penalty for r in requests])
        frequency = _column([r.params.frequency_penalty for r in requests])
        # Dividing a negative logit would make it *more* likely, so negatives are multiplied.
        repeated = mx.where(logits > 0, logits / repetition, logits * repetition)
        logits = mx.where(in_context, repeated, logits)
        return logits - presence * (in_output > 0) - frequency * in_output

    def _block_stop_tokens(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> mx.array:
        """Until ``min_tokens`` are out, EOS (unless ignored) and ``stop_token_ids`` can't be drawn."""
        vocab = logits.shape[-1]
        rows, cols = [], []
        for i, r in enumerate(requests):
            if r.num_output_tokens >= r.params.min_tokens:
                continue
            stops = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                stops.update(self.eos_token_ids)
            stops = [t for t in stops if t < vocab]  # an id past the vocab can't be drawn anyway
            rows += [i] * len(stops)
            cols += stops
        if not rows:
            return logits
        blocked = mx.zeros(logits.shape, mx.bool_)
        blocked[mx.array(rows), mx.array(cols)] = True
        return mx.where(blocked, -mx.inf, logits)

    def _draw(self, logits: mx.array, requests: Sequence[SamplingRequest]) -> mx.array:
        """One token per row from its tempered, truncated distribution (greedy rows get junk)."""
        params = [r.params for r in requests]
        logits = logits / _column([p.temperature if p.temperature > 0 else 1.0 for p in params])
        logits = _min_p(logits, params)
        logits = _top_k_top_p(logits, params)
        keys = self._row_keys(requests)
        noise = mx.vmap(lambda key: mx.random.gumbel(logits.shape[1:], key=key))(keys)
        return mx.argmax(logits + noise, axis=-1)

    def _row_keys(self, requests: Sequence[SamplingRequest]) -> mx.array:
        """A ``[B, 2]`` key per row: a seeded request's depends only on (seed, tokens generated
        so far), so it is reproducible whatever the batch; the rest come from our generator."""
        self._key, step_key = mx.random.split(self._key)
        keys = mx.random.split(step_key, len(requests))
        seeded = [i for i, r in enumerate(requests) if r.params.seed is not None]
        if seeded:
            own = [
                # SeedSequence hashes the pair into well-mixed key bits (negative seeds wrap).
                np.random.SeedSequence((r.params.seed % 2**64, r.num_output_tokens)).generate_state(2)
                for r in (requests[i] for i in seeded)
            ]
            keys[mx.array(seeded)] = mx.array(np.stack(own))
        return keys


def _apply_grammars(logits: mx.array, requests: Sequence[SamplingRequest]) -> mx.array:
    """Structured outputs: each constrained row keeps only the tokens its grammar allows next
    (llguidance's bitmask, computed on the host, one bit per token); other rows pass unchanged."""
    constrained = [(r.grammar, i) for i, r in enumerate(requests) if r.grammar is not None]
    batch, vocab = logits.shape
    bitmask = token_bitmask(constrained, batch, vocab).view(np.uint32)  # [B, ceil(V / 32)]
    bits = (mx.array(bitmask)[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    allowed = bits.reshape(batch, -1)[:, :vocab].astype(mx.bool_)
    return mx.where(allowed, logits, -mx.inf)


def _min_p(logits: mx.array, params: list[SamplingParams]) -> mx.array:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    if all(p.min_p == 0 for p in params):
        return logits
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p); log(0) = -inf keeps every token.
    min_p = _column([p.min_p for p in params])
    cutoff = logits.max(axis=-1, keepdims=True) + mx.log(min_p)
    return mx.where(logits >= cutoff, logits, -mx.inf)


def _top_k_top_p(logits: mx.array, params: list[SamplingParams]) -> mx.array:
    """Keep each row's ``top_k`` best tokens, then the smallest prefix of those holding
    ``top_p`` of their (renormalized) probability. Ties at the cut-off survive together."""
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    truncated = [k < vocab or p.top_p < 1 for k, p in zip(top_k, params)]
    if not any(truncated):
        return logits
    # No row keeps more than `width` tokens, so sorting the `width` best of each row is enough.
    width = max(k for k, t in zip(top_k, truncated) if t)
    best = mx.sort(mx.topk(logits, width, axis=-1), axis=-1)[:, ::-1]  # [B, width], descending
    in_top_k = mx.arange(width)[None, :] < _column(top_k)
    probs = mx.softmax(mx.where(in_top_k, best, -mx.inf), axis=-1)
    top_p = _column([p.top_p for p in params])
    # A token stays while the mass before it is short of top_p: the first one always stays.
    in_top_p = (mx.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1)
    num_kept = (in_top_k & in_top_p).sum(axis=-1, keepdims=True)  # both masks are prefixes
    cutoff = mx.take_along_axis(best, num_kept - 1, axis=-1)
    cutoff = mx.where(_column(truncated), cutoff, -mx.inf)
    return mx.where(logits >= cutoff, logits, -mx.inf)


def _with_logprobs(raw: mx.array, tokens: mx.array, params: list[SamplingParams]) -> PendingSamples:
    """vLLM semantics: logprobs are the log-softmax of the model's own logits, before
    penalties and temperature; every row that asked gets its sampled token's and its top-n."""
    wanted = [p.logprobs for p in params]
    if all(n is None for n in wanted):
        return PendingSamples(tokens, wanted)
    logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    n_max = min(max(n for n in wanted if n is not None), raw.shape[-1])
    top_ids = mx.zeros((len(wanted), 0), mx.int32)
    if n_max > 0:  # partition out the n best, then sort only those
        top_ids = mx.argpartition(-logprobs, kth=n_max - 1, axis=-1)[:, :n_max]
        order = mx.argsort(-mx.take_along_axis(logprobs, top_ids, axis=-1), axis=-1)
        top_ids = mx.take_along_axis(top_ids, order, axis=-1)
    top_values = mx.take_along_axis(logprobs, top_ids, axis=-1)
    return PendingSamples(tokens, wanted, chosen, top_ids, top_values)


def _occurrences(shape: tuple[int, ...], rows: list[int], tokens: list[list[int]]) -> mx.array:
    """``counts[B, V]``: how often each token occurs in ``tokens[k]``, for batch row ``rows[k]``."""
    row_ids = np.repeat(np.asarray(rows, np.int32), [len(t) for t in tokens])
    token_ids = np.fromiter(chain.from_iterable(tokens), np.int32, count=len(row_ids))
    return mx.zeros(shape).at[mx.array(row_ids), mx.array(token_ids)].add(1)


def _column(values: list) -> mx.array:
    """A per-row parameter as a ``[B, 1]`` array, to broadcast over the vocab."""
    return mx.array(values)[:, None]


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
