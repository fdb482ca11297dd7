"""A step in flight: queued on MLX, read back once (the host sync of asynchronous scheduling).

``ModelRunner.execute`` returns a ``PendingStep``; the engine starts it, schedules the next step
meanwhile (whose input ids may be this step's samples, still on the device), then resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from pico_vllm.engine.sequence import Sequence
from pico_vllm.engine.speculative import accepted
from pico_vllm.layers.sampler import PendingSamples


@dataclass
class Sample:
    """A sequence's new token, with its logprobs when the request asked."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class PendingStep:
    """A step whose computation is queued but not yet read back.

    ``start`` hands it to MLX to evaluate in the background; ``resolve`` is the step's one host
    sync: it waits for the samples (and so for the pool writes they read) and returns each
    sampling sequence's new :class:`Sample` s (one, or its kept drafts and the token after them).
    Until then, ``token_ids`` are the samples on the device, which the next step can already take
    as its input ids (asynchronous scheduling).
    """

    def __init__(
        self, seqs: list[Sequence], samples: PendingSamples | None, state: list[mx.array],
        drafts: dict[Sequence, list[int]] | None = None, broken: mx.array | None = None,
        cascade: bool = False, sent: list[mx.array] | None = None,
    ):
        self.seqs, self._samples, self._state = seqs, samples, state
        self._sent = sent or []  # a pipeline stage's hidden states for the next stage
        self.cascade = cascade  # its decode rows read shared blocks once (cascade attention)
        self.drafts = drafts or {}
        self._broken = broken  # [rows] bool: the row's logits were not numbers
        self.failed: list[Sequence] = []  # after resolve: sequences whose logits were broken
        # Each sequence's first row of samples; one per position of its chunk where it drafted.
        widths = [1 + len(self.drafts.get(seq, ())) for seq in seqs]
        self._rows = dict(zip(seqs, np.cumsum([0, *widths[:-1]]).tolist()))

    @property
    def token_ids(self) -> mx.array | None:
        return None if self._samples is None else self._samples.token_ids

    def row_of(self, seq: Sequence) -> int:
        """Where ``seq``'s (first) new token is in ``token_ids``."""
        return self._rows[seq]

    def start(self) -> None:
        mx.async_eval(self._samples or [], self._state, self._sent)

    def resolve(self) -> dict[Sequence, list[Sample]]:
        if self._samples is None:
            # A step of only mid-prompt chunks: nothing to read but the pool (the live list, so
            # the host waits here, which keeps a long prompt's chunks from piling up queued).
            mx.eval(self._state, self._sent)
            return {}
        # The samples alone: they depend on every K/V write of this step (each layer attends
        # after writing), and ``start`` queued the rest. Not ``self._state``: the pool list holds
        # the *next* step's arrays by now, and waiting for them would idle the device while the
        # host builds the step after it.
        mx.eval(self._samples, self._broken, self._sent)
        out = self._samples.resolve()
        logprobs = out.logprobs or [None] * len(out.token_ids)
        rows = list(zip(out.token_ids, logprobs, out.top_logprobs))
        broken = self._broken.tolist()
        samples = {}
        for seq in self.seqs:
            first, drafts = self._rows[seq], self.drafts.get(seq, [])
            if any(broken[first : first + len(drafts) + 1]):
                self.failed.append(seq)
                continue
            tokens = accepted(drafts, out.token_ids[first : first + len(drafts) + 1])
            samples[seq] = [Sample(*row) for row in rows[first : first + len(tokens)]]
        return samples
