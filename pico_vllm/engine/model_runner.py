"""Turns one scheduled step into flat MLX arrays, runs the model, and samples.

The scheduler hands over ``(sequence, n)`` pairs: compute ``n`` more tokens of each sequence.
The runner lays them out as one flat batch of ``T`` tokens — single-token queries (decode rows)
first, then multi-token prefill chunks — with, per token, its id, its position and the pool slot
its K/V goes to, and per decode row or chunk its block table and context length. One forward
pass later, the last position of every sequence whose known tokens are now all computed is
sampled. A sequence with drafts (speculative decoding) is sampled at every position of its
``1 + k`` tokens and keeps the drafts its samples agree with (``speculative.accepted``); its
positions are ``1 + k`` decode rows, each attending over the sequence up to itself (causal
within the chunk by context length alone), which cascade attention reads as one set.

Decode-shaped steps (decode rows only, drafts included) run through captured graphs
(``decode_graphs.py``), padded to a bucket; steps with prefill chunks run eagerly: their shapes
(chunk lengths, how many chunks) vary too much for a bounded set of graphs to pay off, and they
are dominated by large matmuls that compiling cannot make faster.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metal_kernels import prepare as prepare_paged_attention
from pico_vllm.config import EngineConfig
from pico_vllm.engine.block_manager import blocks_for
from pico_vllm.engine.cascade import plan_shared_prefix, shared_prefix_arrays
from pico_vllm.engine.decode_graphs import DecodeGraphs
from pico_vllm.engine.pending_step import PendingStep
from pico_vllm.engine.scheduler import SchedulerOutput
from pico_vllm.engine.sequence import NO_BLOCK, Sequence
from pico_vllm.engine.speculative import DraftPosition
from pico_vllm.layers.attention import AttentionMetadata, PrefillChunk, SharedPrefix
from pico_vllm.layers.kv_cache import KVCache, KVSpec
from pico_vllm.layers.sampler import PendingSamples, Sampler
from pico_vllm.pipeline import micro_batches


class _Forward(NamedTuple):
    """One forward's share of a step: the sequences that sample and their sampling requests,
    then the logits of those rows (and their argmax, from a captured decode graph) on the last
    pipeline stage, or the hidden states sent on from an earlier one."""

    seqs: list[Sequence]
    requests: list
    cascade: bool  # its decode rows read shared blocks once
    logits: mx.array | None = None
    argmax: mx.array | None = None
    sent: mx.array | None = None


def _joined(arrays: list[mx.array]) -> mx.array:
    """The parts' rows as one array (no copy for a step in one part)."""
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)


def _in_decode_rows(seq: Sequence, n: int, drafts: dict[Sequence, list[int]]) -> bool:
    """Whether ``seq``'s ``n`` tokens of a step are decode rows, one per token: a single token,
    or a chunk verifying drafts (each position over the sequence up to itself)."""
    return n == 1 or seq in drafts


def decode_graph_arrays(input_ids: mx.array, positions: mx.array, meta: AttentionMetadata) -> list[mx.array]:
    """A decode-only step's arrays, flat, as ``ModelRunner._decode_step`` (a graph) takes them."""
    return [input_ids, positions, meta.slot_blocks, meta.slot_offsets, meta.block_tables, meta.context_lens,
            meta.state_slots, *(meta.shared_prefix or ())]


class ModelRunner:
    """Owns the model, the KV pool (its size and dtype) and the sampler; ``execute`` runs one
    scheduled step."""

    def __init__(self, model: nn.Module, config: EngineConfig, sampler: Sampler, dtype: mx.Dtype) -> None:
        """``config`` as the engine resolved it: ``num_blocks`` and ``max_model_len`` set."""
        self.model = model
        self.stage = getattr(model, "stage", None)  # this rank's layers, under pipeline parallelism
        self.sampler = sampler
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks
        spec: KVSpec = model.kv_spec
        # A hybrid model's linear layers keep one state slot per running sequence (the scheduler
        # admits at most max_num_seqs and hands out Sequence.state_slot), and its prefix cache's
        # snapshots.
        self.cache = KVCache(spec, self.num_blocks, config.block_size, dtype, model.state_spec,
                             config.max_num_seqs, config.num_state_snapshots or 0)
        # On a Mac: self-check the decode kernel's instance now, before any graph is traced.
        prepare_paged_attention(dtype, spec.num_q_heads, spec.num_kv_heads, spec.head_dim, config.block_size)
        max_blocks = min(blocks_for(config.max_model_len, config.block_size), self.num_blocks)
        # Cascade attention for decode rows sharing leading blocks, where every layer attends over
        # its whole context (a sliding window's start moves with each row).
        windowed = any(w is not None for w in self.cache.layout.windows)
        self.cascade_enabled = not config.disable_cascade_attn and not windowed
        self.graphs = None
        if config.capture_graphs != "off" and model.supports_graphs:
            # Every running sequence may verify 1 + k rows (within the step's token budget).
            spec = config.speculative
            rows_per_seq = 1 + (spec.num_speculative_tokens if spec is not None else 0)
            max_rows = max(config.max_num_seqs,
                           min(config.max_num_seqs * rows_per_seq, config.max_num_batched_tokens))
            self.graphs = DecodeGraphs(self._decode_step, self.cache.state, max_rows, max_blocks)

    def execute(self, out: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Queue one step: write the new tokens' K/V into the pool and sample where due.

        A decode whose input token is still a placeholder takes it from ``previous`` (the step
        that sampled it, not yet read back) on the device.
        """
        if out.restores:  # admitted from a snapshot: their state resumes where its prefix ends
            self.cache.states.copy(out.restores)
        drafts = out.drafts
        # Stable: decode rows (decodes, drafts' chunks) first, then prompt chunks.
        batch = sorted(out.scheduled, key=lambda item: not _in_decode_rows(*item, drafts))
        # Under pipeline parallelism the step goes down the stages in parts (micro-batches).
        parts = []
        for part, offsets in self._micro_batches(batch):
            forward = self._forward(part, drafts, previous, offsets)
            parts.append(forward)
            if self.stage is not None:
                # Handed to MLX part by part: a stage's sends and receives have no inputs to
                # order them by, so the parts go down the pipeline in the order they are queued.
                outputs = [a for a in (forward.logits, forward.argmax, forward.sent) if a is not None]
                mx.async_eval(outputs, self.cache.state)
        if out.snapshots:  # the states where this step ends a block, for the prefix cache
            self.cache.states.copy(out.snapshots)
        seqs = [seq for part in parts for seq in part.seqs]
        requests = [request for part in parts for request in part.requests]
        sent = [part.sent for part in parts if part.sent is not None]
        cascade = any(part.cascade for part in parts)
        if not seqs:
            return PendingStep([], None, self.cache.state, cascade=cascade, sent=sent)
        samples = broken = None
        if self.stage is None or self.stage.is_last:
            logits = _joined([part.logits for part in parts if part.seqs])
            argmaxes = [part.argmax for part in parts if part.seqs]
            if all(a is not None for a in argmaxes) and self.sampler.is_plain_argmax(seqs):
                samples = PendingSamples(_joined(argmaxes), [None] * len(requests))
            else:
                samples = self.sampler.sample(logits, requests)
            # A row whose logits hold NaN or +inf (a broken checkpoint, an overflow) fails its request.
            broken = mx.logical_or(mx.isnan(logits), logits == mx.inf).any(axis=-1)
        if self.stage is not None:  # the last stage's samples, on every rank
            samples, broken = self._share_samples(samples, broken, requests, sent)
        return PendingStep(seqs, samples, self.cache.state, drafts, broken, cascade, sent)

    def _forward(self, batch: list[tuple[Sequence, int]], drafts: dict[Sequence, list[int]],
                 previous: PendingStep | None, offsets: dict[Sequence, int]) -> _Forward:
        """One forward over ``batch`` (the whole step, or one micro-batch of it, in which a
        chunk's piece may start ``offsets[seq]`` tokens into the chunk)."""
        # A sequence samples once every token it knows (and its drafts) has its K/V computed.
        rows = [
            i for i, (seq, n) in enumerate(batch)
            if seq.num_computed_tokens + offsets.get(seq, 0) + n == seq.num_tokens + len(drafts.get(seq, ()))
        ]
        seqs = [batch[i][0] for i in rows]
        decode_shaped = all(_in_decode_rows(seq, n, drafts) for seq, n in batch)
        bucket = self._graph_bucket(batch) if decode_shaped else None
        pad_rows, pad_width = bucket or (None, None)
        input_ids, positions, meta = self.prepare(batch, drafts, pad_rows, pad_width, offsets)
        input_ids = self._take_placeholders(input_ids, batch, previous)
        cascade = meta.shared_prefix is not None
        # The logits of the rows that sample: mid-prompt chunks need none; a drafting sequence
        # samples at its chunk's every position, as if its drafts were out.
        ends = np.cumsum([n for _, n in batch]).tolist()
        logit_rows, requests = [], []
        for i in rows:
            seq = batch[i][0]
            if seq in drafts:
                logit_rows += range(ends[i] - 1 - len(drafts[seq]), ends[i])
                requests += [DraftPosition(seq, drafts[seq][:j]) for j in range(len(drafts[seq]) + 1)]
            else:
                logit_rows.append(ends[i] - 1)
                requests.append(seq)
        if decode_shaped:  # every row's logits (a graph's padding too), then the sampled ones
            outputs = self._run_decode(input_ids, positions, meta, captured=bucket is not None)
            if len(outputs) == 1:  # a pipeline stage before the last: what it sent on
                return _Forward(seqs, requests, cascade, sent=outputs[0])
            index = mx.array(logit_rows, mx.int32)
            logits, argmax = (outputs[0][index], outputs[1][index]) if logit_rows else outputs
            return _Forward(seqs, requests, cascade, logits, argmax)
        # The LM head only for the rows that sample.
        out = self.model(input_ids, positions, self.cache, meta, mx.array(logit_rows, mx.int32))
        if self.stage is not None and not self.stage.is_last:
            return _Forward(seqs, requests, cascade, sent=out)
        return _Forward(seqs, requests, cascade, out.astype(mx.float32))

    def _micro_batches(self, batch: list[tuple[Sequence, int]]
                       ) -> list[tuple[list[tuple[Sequence, int]], dict[Sequence, int]]]:
        """``batch`` in one part per pipeline stage (``pipeline.micro_batches``), each with
        where its pieces of cut chunks start; whole without."""
        if self.stage is None:
            return [(batch, {})]
        parts = micro_batches([n for _, n in batch], self.stage.group.size())
        return [([(batch[i][0], n) for i, _, n in part],
                 {batch[i][0]: first for i, first, _ in part if first}) for part in parts]

    def _share_samples(self, samples: PendingSamples | None, broken: mx.array | None, requests: list,
                       sent: list[mx.array]) -> tuple[PendingSamples, mx.array]:
        """The last stage's samples on every rank (``PipelineStage.share_samples``)."""
        wanted = [request.params.logprobs for request in requests]
        asked = [n for n in wanted if n is not None]
        num_top = min(max(asked), self.model.vocab_size) if asked else None
        logprobs = None
        if samples is not None and asked:
            logprobs = (samples.logprobs, samples.top_ids, samples.top_values)
        token_ids, broken, shared = self.stage.share_samples(
            None if samples is None else samples.token_ids, broken, logprobs, len(requests), num_top, sent)
        return PendingSamples(token_ids, wanted, *(shared or ())), broken

    def capture_all(self, progress=None) -> int:
        """Trace every decode bucket now (vLLM-style start-up capture); returns how many."""
        buckets = self.graphs.all_buckets() if self.graphs else []
        for batch, width in progress(buckets) if progress else buckets:
            arrays = decode_graph_arrays(*self.prepare([], rows=batch, width=width))
            mx.eval(self.graphs(*arrays), self.cache.state)  # all padding: only scratch is written
        return len(buckets)

    def needs_token_values(self, out: SchedulerOutput) -> bool:
        """Whether building this step's sampler reads the ids of earlier tokens on the host
        (penalties count them): then the previous step must be read back first."""
        return any(self.sampler.reads_token_ids(seq) for seq, _ in out.scheduled)

    def _graph_bucket(self, batch: list[tuple[Sequence, int]]) -> tuple[int, int] | None:
        """The (rows, block-table width) a decode-shaped step is padded to for its captured
        graph; None where it runs eagerly (no graphs, or more rows than any graph), unpadded."""
        if self.graphs is None:
            return None
        rows = sum(n for _, n in batch)
        width = max(blocks_for(seq.num_computed_tokens + n, self.block_size) for seq, n in batch)
        return self.graphs.bucket(rows, width)

    def _run_decode(self, input_ids: mx.array, positions: mx.array, meta: AttentionMetadata,
                    captured: bool) -> tuple[mx.array, ...]:
        """A decode-shaped step's ``(logits, argmax)`` for every row (padding included): through
        its ``captured`` graph, or eagerly."""
        arrays = decode_graph_arrays(input_ids, positions, meta)
        return tuple(self.graphs(*arrays)) if captured else self._decode_step(*arrays)

    @staticmethod
    def _take_placeholders(
        input_ids: mx.array, batch: list[tuple[Sequence, int]], previous: PendingStep | None
    ) -> mx.array:
        """Put the device-side ids of not-yet-read tokens into ``input_ids``. Only a decode
        (first in the batch) can hold one: the newest token of its sequence (a sequence drafts
        from tokens on the host)."""
        starts = np.cumsum([0] + [n for _, n in batch]).tolist()
        pending = [
            (starts[i], previous.row_of(seq)) for i, (seq, n) in enumerate(batch)
            if n == 1 and seq.is_pending(seq.num_computed_tokens)
        ]
        if not pending:
            return input_ids
        rows, sources = zip(*pending)
        input_ids[mx.array(rows)] = previous.token_ids[mx.array(sources)]
        return input_ids

    def _decode_step(self, input_ids, positions, slot_blocks, slot_offsets, block_tables, context_lens,
                     state_slots, *shared_prefix):
        """One decode token per row -> ``(logits[B, V], argmax[B])`` (``(sent,)`` on a pipeline
        stage before the last); what the graphs capture
        (``decode_graph_arrays``: ``mx.compile`` takes arrays, not a metadata tuple).
        ``shared_prefix``: the four arrays of a ``SharedPrefix``, or none."""
        shared = SharedPrefix(*shared_prefix) if shared_prefix else None
        meta = AttentionMetadata(slot_blocks, slot_offsets, block_tables, context_lens, shared_prefix=shared,
                                 state_slots=state_slots)
        out = self.model(input_ids, positions, self.cache, meta)
        if self.stage is not None and not self.stage.is_last:
            return (out,)  # the hidden states sent to the next stage
        logits = out.astype(mx.float32)
        return logits, mx.argmax(logits, axis=-1)

    @property
    def _scratch_slot(self) -> int:
        return 0 if self.cache.states is None else self.cache.states.scratch_slot

    def _state_slot(self, seq: Sequence) -> int:
        """``seq``'s slot in the state pool (any number for a model without one)."""
        if seq.state_slot is None:
            if self.cache.states is not None:
                raise ValueError(f"{seq.request_id!r} was scheduled without a state slot")
            return 0
        return seq.state_slot

    def _tables(self, seq: Sequence, num_blocks: int) -> np.ndarray:
        """``seq``'s first ``num_blocks`` blocks in every layer group, ``[G, num_blocks]``; a block a
        sliding group gave back (``NO_BLOCK``) is the scratch block, which no query reads there."""
        tables = np.array([table[:num_blocks] for table in seq.block_tables], np.int32)
        return np.where(tables == NO_BLOCK, self.cache.scratch_block, tables)

    def _shared_prefix(self, tables: list[np.ndarray], lengths: list[int], owners: list[int], rows: int,
                       padded: bool) -> SharedPrefix | None:
        """Cascade attention's arrays for these decode rows of sequences ``owners``
        (``engine/cascade.py``), or None when cascade is off or no rows share enough blocks; for
        a step ``padded`` for a captured graph, their dimensions are bucketed too."""
        if not self.cascade_enabled:
            return None
        plan = plan_shared_prefix([t[0] for t in tables], lengths, owners, self.block_size)
        if not plan:
            return None
        return shared_prefix_arrays(plan, tables, lengths, rows, self.block_size, self.cache.scratch_block,
                                    self.graphs if padded else None)

    def prepare(
        self, batch: list[tuple[Sequence, int]], drafts: dict[Sequence, list[int]] | None = None,
        rows: int | None = None, width: int | None = None, offsets: dict[Sequence, int] | None = None,
    ) -> tuple[mx.array, mx.array, AttentionMetadata]:
        """Flat ``input_ids[T]``, ``positions[T]`` and the attention metadata of a step; a
        sequence's ``drafts`` follow its known tokens. The one builder of every step's arrays:
        eager, mixed, and captured decode graphs.

        ``batch`` must list decode rows (single tokens, and the chunks of sequences with
        ``drafts``: a row per position) before prompt chunks. A decode-shaped step may be
        padded to a graph bucket: ``rows`` single-token rows (the padding: token 0 at
        position 0, written to the scratch block, over a context of length 0) and block tables
        ``width`` blocks wide. ``offsets``: a chunk's piece (pipeline micro-batches) starts that
        many tokens after the sequence's computed ones.
        """
        drafts, offsets = drafts or {}, offsets or {}
        bs, groups, scratch = self.block_size, len(self.cache.layout.windows), self.cache.scratch_block
        ids, pos, slot_blocks = [], [], []
        decode_tables, decode_lens, decode_slots, owners, prefills = [], [], [], [], []
        start = 0
        for index, (seq, n) in enumerate(batch):
            first = seq.num_computed_tokens + offsets.get(seq, 0)
            positions = np.arange(first, first + n, dtype=np.int32)
            context_len = first + n
            table = self._tables(seq, blocks_for(context_len, bs))
            tokens = seq.token_ids[first : first + n] + drafts.get(seq, [])
            ids.append(np.asarray(tokens[:n], dtype=np.int32))
            pos.append(positions)
            slot_blocks.append(table[:, positions // bs])
            if _in_decode_rows(seq, n, drafts):
                decode_tables += [table] * n
                decode_lens += range(first + 1, context_len + 1)
                decode_slots += [self._state_slot(seq)] * n
                owners += [index] * n
            else:
                prefills.append(PrefillChunk(start, n, context_len, mx.array(table), self._state_slot(seq)))
            start += n
        padding = rows - len(decode_tables) if rows else 0
        if padding and prefills:
            raise ValueError("only a decode-only step is padded (padding rows would sit before the chunks)")
        ids.append(np.zeros(padding, np.int32))
        pos.append(np.zeros(padding, np.int32))
        slot_blocks.append(np.full((groups, padding), scratch, np.int32))

        num_decode = len(decode_tables) + padding
        width = width or max((t.shape[1] for t in decode_tables), default=1)
        block_tables = np.full((groups, num_decode, width), scratch, np.int32)
        for row, table in enumerate(decode_tables):
            block_tables[:, row, : table.shape[1]] = table
        positions = np.concatenate(pos)
        meta = AttentionMetadata(
            slot_blocks=mx.array(np.concatenate(slot_blocks, axis=1)),
            slot_offsets=mx.array(positions % bs),
            block_tables=mx.array(block_tables),
            context_lens=mx.array(np.asarray(decode_lens + [0] * padding, dtype=np.int32)),
            prefills=tuple(prefills),
            shared_prefix=self._shared_prefix(decode_tables, decode_lens, owners, num_decode,
                                              padded=rows is not None),
            state_slots=mx.array(np.asarray(decode_slots + [self._scratch_slot] * padding, dtype=np.int32)),
        )
        return mx.array(np.concatenate(ids)), mx.array(positions), meta
