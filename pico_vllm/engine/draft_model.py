"""Speculative decoding with a draft model: a smaller model of the same vocabulary guesses the
next ``k`` tokens of every drafting sequence (greedily, all sequences in one batch per round),
and the target verifies them in its step like any drafts (``speculative.py``).

The draft model's KV pool mirrors the target's: as many blocks of the same size, addressed by
the same block tables, so the scheduler's allocation for a step's drafts covers both pools and
nothing else is managed. ``seq.draft_kv_tokens`` lists the tokens whose draft K/V the pool holds
(from position 0). A round first runs the draft over the sequence's tokens it has not seen — the
whole prompt the first time, then usually the kept drafts and the target's token after them —
as one chunk per sequence (whose last row gives the first draft), then ``k - 1`` single-token
steps. Drafts the target rejects leave draft K/V past the tokens kept, overwritten later, as in
the target's pool.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from pico_vllm.config import EngineConfig, SpeculativeConfig
from pico_vllm.engine.model_runner import ModelRunner
from pico_vllm.engine.sequence import Sequence
from pico_vllm.engine.speculative import DraftProposer
from pico_vllm.layers.sampler import Sampler
from pico_vllm.loader import LoadedModel, load


@dataclass(eq=False)  # hashed by identity, as sequences are
class _DraftView:
    """What ``ModelRunner.prepare`` reads of a sequence, as the draft model sees it."""

    token_ids: list[int]
    num_computed_tokens: int
    block_tables: list[list[int]]
    state_slot: int | None = None  # a draft model has no state pool (hybrid drafts are refused)


class DraftModelProposer(DraftProposer):
    """Drafts with a second model in the same engine (vLLM's ``"draft_model"`` method); requests
    with a prediction draft from it instead."""

    def __init__(self, config: SpeculativeConfig, draft: LoadedModel, runner: ModelRunner) -> None:
        super().__init__(config)
        self.draft, self.runner = draft, runner

    @classmethod
    def load(cls, config: SpeculativeConfig, engine: EngineConfig, target: LoadedModel,
             num_groups: int) -> DraftModelProposer:
        """Load ``config.model`` with a pool of as many blocks as the target's (``engine``, resolved);
        ValueError where the pair cannot work (another vocabulary, sliding windows, tensor
        parallelism)."""
        if engine.tensor_parallel_size > 1:
            raise ValueError("speculative_config: a draft model under tensor parallelism is not "
                             "supported yet (ngram is)")
        draft = load(config.model, engine.dtype, engine.model_impl)
        if draft.model.state_spec is not None:
            raise ValueError(f"speculative_config: the draft model {config.model!r} is a hybrid "
                             "(linear layers with recurrent state), whose drafts cannot be rolled "
                             "back yet; use an attention-only draft or ngram")
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ValueError(f"speculative_config: the draft model {config.model!r} has another "
                             "vocabulary than the target; drafts must be the target's tokens")
        runner = ModelRunner(draft.model, replace(engine, capture_graphs="off"), Sampler(set()), draft.dtype)
        if num_groups > 1 or len(runner.cache.layout.windows) > 1:
            raise ValueError("speculative_config: a draft model needs a target and a draft whose "
                             "layers all attend over the whole context (no sliding windows)")
        return cls(config, draft, runner)

    def propose_all(self, wanted: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        predicted = {seq: k for seq, k in wanted.items() if seq.prediction is not None}
        drafts = super().propose_all(predicted)
        drafting = {seq: k for seq, k in wanted.items() if seq.prediction is None}
        if drafting:
            drafts |= self._draft(drafting)
        return drafts

    def _draft(self, wanted: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        seqs = list(wanted)
        # Round 0: every token the draft has not seen, up to the newest; its last row drafts.
        batch = []
        for seq in seqs:
            seen = min(_common_prefix(seq.draft_kv_tokens, seq.token_ids), seq.num_tokens - 1)
            batch.append((_DraftView(seq.token_ids, seen, seq.block_tables), seq.num_tokens - seen))
        drafts = {seq: [token] for seq, token in zip(seqs, self._forward(batch))}
        # Rounds 1 .. k-1: the previous draft in, the next one out.
        for j in range(1, max(wanted.values())):
            active = [seq for seq in seqs if wanted[seq] > j]
            batch = [(_DraftView(seq.token_ids + drafts[seq], seq.num_tokens - 1 + j, seq.block_tables), 1)
                     for seq in active]
            for seq, token in zip(active, self._forward(batch)):
                drafts[seq].append(token)
        for seq in seqs:
            seq.draft_kv_tokens = seq.token_ids + drafts[seq][:-1]
        return drafts

    def _forward(self, batch: list[tuple[_DraftView, int]]) -> list[int]:
        """The draft model's greedy next token after each view's chunk (K/V written)."""
        order = sorted(range(len(batch)), key=lambda i: batch[i][1] > 1)  # decodes first
        ordered = [batch[i] for i in order]
        input_ids, positions, meta = self.runner.prepare(ordered)
        last_rows = mx.array(np.cumsum([n for _, n in ordered]) - 1, mx.int32)
        logits = self.draft.model(input_ids, positions, self.runner.cache, meta, last_rows)
        tokens = mx.argmax(logits, axis=-1).tolist()
        out = [0] * len(batch)
        for position, i in enumerate(order):
            out[i] = tokens[position]
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if len(differs) else n
