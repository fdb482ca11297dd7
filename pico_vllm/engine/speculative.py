"""Speculative decoding: drafts (n-gram lookup, a client's prediction; a draft model in
``draft_model.py``) verified inside the continuous batch.

A sequence that is decoding may *draft* up to ``k`` tokens: where its last ``n`` tokens occurred
earlier in its prompt or output, the tokens that followed them there are a guess at what comes
next (code being edited, a document being quoted, a list being continued). The step then computes
the sequence's pending token and its drafts as one chunk of ``1 + k`` query tokens, like a prefill
chunk, and samples a token at every position of the chunk, each with the sequence's own
parameters as if the drafts before it had been generated (``DraftPosition``).

Verification keeps the drafts the target agrees with: while the token sampled at position ``i``
equals draft ``i`` the draft stands; the first disagreement (or, when all drafts stand, the token
after them) is the step's last token. A draft proposes one token with certainty, so drawing from
the target and comparing is rejection sampling exactly (accept ``d`` with probability ``p(d)``,
else draw from ``p`` without ``d``): greedy and seeded requests produce token for token what they
produce without speculation (the noise of output position ``j`` is the same either way), and
unseeded ones the same distribution. The K/V computed for rejected drafts sits past the
sequence's computed length and is overwritten later; rejected tokens never enter the prefix cache.

A request may also bring its own draft source: the output the client expects (OpenAI's
Predicted Outputs, ``SamplingParams.prediction``), say the file it asks to have edited. While the
output follows the prediction its next tokens are drafted from there; where the output departs
from it, drafting resumes after the latest few output tokens' place in the prediction.

Drafting needs the newest token on the host, and how many drafts a step kept decides where its
sequence goes on: under asynchronous scheduling the engine reads a step back before queueing the
next when it verified drafts or a sequence is about to draft (``Scheduler.wants_drafts``), and
otherwise overlaps steps as usual.
A sequence whose drafts keep failing, or that finds nothing to draft from, pauses drafting
(``pause_drafting``), so a workload without repetition costs little.
"""

from __future__ import annotations

import numpy as np

from pico_vllm.config import SpeculativeConfig
from pico_vllm.engine.sequence import OutputTokens, Sequence
from pico_vllm.sampling_params import SamplingParams

MAX_PAUSE = 16  # steps without drafts, at most, after drafts kept failing
PREDICTION_DRAFT_TOKENS = 8  # drafts per step from a prediction when speculative_config is off


class NgramProposer:
    """Drafts from the sequence's own tokens (vLLM's ``NgramProposer``)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the last ``n`` tokens,
        for the longest ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min`` that occurs."""
        tokens = np.asarray(token_ids)
        # Windows of the tokens before the last one: where the pattern was.
        match = self._longest_match(tokens, tokens[:-1])
        if match is None:
            return []
        n, hits = match
        # The latest occurrence followed by k tokens (the freshest context), else the earliest
        # (in a loop, the one followed by the most tokens).
        whole = hits[hits + n + k <= len(tokens)]
        start = (whole[-1] if len(whole) else hits[0]) + n
        return tokens[start : start + k].tolist()

    def continue_from(self, token_ids: list[int], source: list[int], offset: int, k: int) -> list[int]:
        """Up to ``k`` tokens of ``source`` after the longest suffix of ``token_ids`` found in
        it (``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens), at the occurrence ending
        nearest to ``offset``."""
        match = self._longest_match(np.asarray(token_ids), np.asarray(source))
        if match is None:
            return []
        n, hits = match
        ends = hits + n
        start = int(ends[np.argmin(np.abs(ends - offset))])
        return source[start : start + k]

    def _longest_match(self, tokens: np.ndarray, source: np.ndarray) -> tuple[int, np.ndarray] | None:
        """``(n, where)``: the longest ``n`` whose last ``n`` tokens occur in ``source``, and the
        start of each occurrence; None if no suffix of ``prompt_lookup_min`` tokens does."""
        longest = min(self.config.prompt_lookup_max, len(tokens) - 1, len(source))
        for n in range(longest, self.config.prompt_lookup_min - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(source, n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                return n, hits
        return None


class DraftProposer:
    """Where a decoding sequence's drafts come from: the client's prediction of the output when
    it gave one (OpenAI's Predicted Outputs, ``SamplingParams.prediction``), else the sequence's
    own tokens when n-gram speculation is on."""

    def __init__(self, config: SpeculativeConfig | None) -> None:
        self.config = config
        self.ngram = NgramProposer(config or SpeculativeConfig())

    def max_drafts(self, seq: Sequence) -> int:
        """Drafts ``seq`` may verify per step (0: it does not draft)."""
        if self.config is not None:
            return self.config.num_speculative_tokens
        return PREDICTION_DRAFT_TOKENS if seq.prediction is not None else 0

    def propose_all(self, wanted: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """Drafts for each sequence, at most as many as ``wanted`` says."""
        return {seq: self.propose(seq, k) for seq, k in wanted.items()}

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to ``k`` guesses at ``seq``'s next tokens: from its prediction, and where that has
        none, from its own tokens when n-gram speculation is on."""
        drafts = [] if seq.prediction is None else self._from_prediction(seq, k)
        if not drafts and self.config is not None and self.config.method == "ngram":
            drafts = self.ngram.propose(seq.token_ids, k)
        return drafts

    def _from_prediction(self, seq: Sequence, k: int) -> list[int]:
        output, prediction = seq.output_token_ids, seq.prediction
        if output == prediction[: len(output)]:
            return prediction[len(output) : len(output) + k]  # on track: what the client predicted next
        # Off track (the output edits the prediction): resume after the latest n tokens where
        # they occur in the prediction nearest to the same offset.
        return self.ngram.continue_from(seq.token_ids, prediction, len(output), k)


class DraftPosition(OutputTokens):
    """What the sampler sees at position ``i`` of a verified chunk: the sequence as if its first
    ``i`` drafts had been generated (penalties count them, ``min_tokens`` and seeds use the output
    position). Satisfies the sampler's ``SamplingRequest``."""

    grammar = None  # requests with a grammar do not draft

    def __init__(self, seq: Sequence, drafts: list[int]) -> None:
        self.params: SamplingParams = seq.params
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.token_ids = seq.token_ids + drafts


def accepted(drafts: list[int], sampled: list[int]) -> list[int]:
    """The step's tokens: the drafts the target sampled too, then its first other token (or the
    token after the last draft). ``sampled`` has one token per position, ``len(drafts) + 1``."""
    keep = 0
    while keep < len(drafts) and sampled[keep] == drafts[keep]:
        keep += 1
    return sampled[: keep + 1]


def after_verification(seq: Sequence, drafted: int, kept: int) -> None:
    """Adapt ``seq``'s drafting: all ``drafted`` kept, try two more next time; some rejected,
    one fewer (at least one); every draft rejected also doubles its pause (up to ``MAX_PAUSE``
    steps), any draft kept ends it. (Hugging Face's heuristic for assisted generation: a
    verified row costs time, so rows unlikely to be kept are not drafted.)"""
    if drafted == 0:
        return
    seq.draft_limit = drafted + 2 if kept == drafted else max(1, drafted - 1)
    if kept == 0:
        pause_drafting(seq)
    else:
        seq.draft_failures = seq.draft_pause = 0


def pause_drafting(seq: Sequence) -> None:
    """Another failure (every draft rejected, or nothing to draft from): ``seq`` pauses drafting
    for twice the steps it paused last time (up to ``MAX_PAUSE``). Paused, its steps overlap
    under asynchronous scheduling."""
    seq.draft_failures += 1
    seq.draft_pause = min(MAX_PAUSE, 2 ** (seq.draft_failures - 1))
