"""Iteration-level scheduling: which tokens of which sequences the next step computes.

Every step has a token budget (``max_num_batched_tokens``). Running sequences are served
first, in admission order: a decode costs one token, a sequence still mid-prompt gets its next
chunk. Whatever budget is left admits waiting sequences FIFO, each with a prefill chunk of up to
the remaining budget (chunked prefill: a long prompt spreads over several steps while decodes
keep flowing). When the pool has no block for a running sequence, the most recently admitted
one is *preempted*: its blocks are freed and it goes back to the front of the queue, to be
recomputed later — usually cheaply, since its full blocks survive in the prefix cache.

A waiting prompt whose first block past its cache hit is one a running sequence is computing
right now waits for it (admission pauses, FIFO): blocks enter the prefix cache only once
computed, so requests that arrive together with a shared system prompt would otherwise all
compute it. One step later they find it cached, and all of them are admitted together, each
computing only its own tokens.

A hybrid model's prefix cache also needs its linear layers' state where a hit ends
(``state_snapshots.py``): there a multi-token chunk ends on the last block boundary inside it
(so a prompt's last partial block is one more, small, chunk), and a step that ends a sequence's
block copies its state into a snapshot slot.

With speculative decoding a decoding sequence may also compute *drafts*: guessed next tokens,
verified in the same step (``speculative.py``). They use budget left by the decodes before them,
and never cost another sequence its blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from pico_vllm.config import EngineConfig
from pico_vllm.engine.block_manager import BlockManager
from pico_vllm.engine.sequence import Sequence, SequenceStatus
from pico_vllm.engine.speculative import DraftProposer, pause_drafting
from pico_vllm.engine.state_snapshots import StateSnapshots


@dataclass
class SchedulerOutput:
    """One step's work: for each ``(seq, n)``, compute
    ``(seq.token_ids + drafts[seq])[seq.num_computed_tokens : seq.num_computed_tokens + n]``."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    drafts: dict[Sequence, list[int]] = field(default_factory=dict)  # guesses to verify
    # A hybrid model's state-pool copies, (from slot, to slot): snapshots that admitted sequences
    # resume from, before the step; sequences' states where the step ends a block, after it.
    restores: list[tuple[int, int]] = field(default_factory=list)
    snapshots: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Continuous batching over a fixed block pool (see the module docstring)."""

    def __init__(
        self, config: EngineConfig, windows: tuple[int | None, ...] = (None,),
        proposer: DraftProposer | None = None,
    ) -> None:
        """``windows``: each layer group's sliding window (None: full attention; see
        ``BlockManager``); ``proposer`` drafts for decoding sequences (default: from their
        predictions, and with n-gram speculation from their own tokens)."""
        if config.num_blocks is None or config.max_model_len is None:
            raise ValueError("the scheduler needs the pool's size and max_model_len: pass the config "
                             "as LLMEngine resolved it (num_blocks and max_model_len set)")
        self.config = config
        # A hybrid's snapshot slots follow the max_num_seqs slots of running sequences.
        snapshots = None
        if config.enable_prefix_caching and config.num_state_snapshots:
            first = config.max_num_seqs
            snapshots = StateSnapshots(range(first, first + config.num_state_snapshots))
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, windows, snapshots
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        # Each running sequence holds one state slot (a hybrid model's state pool has
        # max_num_seqs of them): taken at admission, given back when it stops running.
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.proposer = proposer or DraftProposer(config.speculative)

    @property
    def num_free_state_slots(self) -> int:
        """State slots no running sequence holds (a hybrid model's state pool has one per slot)."""
        return len(self._free_slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue ``seq``; a request that could never fit is rejected now, never mid-run."""
        max_len = seq.num_tokens + seq.params.max_tokens
        if max_len > self.config.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_tokens} tokens) + max_tokens ({seq.params.max_tokens}) = "
                f"{max_len} exceeds max_model_len ({self.config.max_model_len})"
            )
        blocks = self.block_manager.blocks_needed(max_len, self.config.max_num_batched_tokens)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs {blocks} KV blocks for {max_len} tokens, but the pool has only "
                f"{self.block_manager.num_blocks} blocks"
            )
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        wanted: dict[Sequence, int] = {}  # sequences that may draft, and how many tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._reached_length(seq):
                i += 1  # its last token is still on its way to the host: nothing more to compute
                continue
            n = self._chunk(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            k = self._draft_limit(seq, budget) if n == 1 else 0
            if k and self.block_manager.allocate(seq, seq.num_computed_tokens + 1 + k):
                wanted[seq] = k
                n += k  # (allocated just now: the loop below finds room at once)
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1

        budget += self._propose(out, wanted)
        in_progress = {digest for s in self.running for digest in self._prompt_blocks_to_compute(s)}
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            and not out.preempted  # blocks are short: let the preempted go first, next step
        ):
            seq = self.waiting[0]
            restore = self.block_manager.share_cached_prefix(seq)
            blocks = self._prompt_blocks_to_compute(seq)
            if blocks and blocks[0] in in_progress:
                self._release(seq)  # its next block is being computed now: a cache hit next step
                break
            n = self._chunk(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                self._release(seq)  # give back the cache hits; retry next step
                break
            in_progress.update(blocks)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.state_slot = self._free_slots.pop()
            if restore is not None:
                out.restores.append((restore, seq.state_slot))
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        self._take_snapshots(out)
        return out

    def advance(self, out: SchedulerOutput, sampling: Collection[Sequence]) -> None:
        """Record a queued step: computed tokens advance, full blocks enter the prefix cache,
        and each sequence in ``sampling`` gets a placeholder for its new token, which the engine
        fills once the host reads it (``Sequence.fill_placeholder``)."""
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if seq in sampling:
                seq.append_placeholder()

    def tokens_known(self, seq: Sequence, index: int, token_ids: list[int], num_rejected: int = 0) -> None:
        """The tokens sampled from ``index`` on reached the host (more than one where drafts were
        kept): blocks they complete can be cached. The K/V of the ``num_rejected`` drafts after
        the kept ones is rolled back first: it was computed from wrong tokens, so it neither
        counts as computed nor enters the prefix cache (the next steps overwrite it)."""
        seq.num_computed_tokens -= num_rejected
        seq.fill_placeholder(index, token_ids[0])
        for token_id in token_ids[1:]:
            seq.append_token(token_id)
        self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire ``seq``; its blocks are freed (full cached ones stay reusable)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)  # num_cached_tokens stays: it is reported in the output
        self._give_back_slot(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> bool:
        """Finish the live request ``request_id`` as "abort"; False if there is none."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq)
                return True
        return False

    def _propose(self, out: SchedulerOutput, wanted: dict[Sequence, int]) -> int:
        """Draft for the ``wanted`` sequences (all at once: a draft model batches them) and
        schedule what came back; returns the budget that fewer drafts left unused."""
        if not wanted:
            return 0
        drafts = self.proposer.propose_all(wanted)
        unused = 0
        for index, (seq, n) in enumerate(out.scheduled):
            if seq in wanted:
                got = drafts.get(seq, [])
                if got:
                    out.drafts[seq] = got
                else:
                    pause_drafting(seq)  # nothing to draft from: look again later
                out.scheduled[index] = (seq, 1 + len(got))
                unused += n - 1 - len(got)
        return unused

    def _chunk(self, seq: Sequence, n: int) -> int:
        """``n`` tokens of ``seq`` to compute, fewer where state snapshots need a multi-token
        chunk to end on the last block boundary inside it."""
        if self.block_manager.snapshots is None or n == 1:
            return n
        past = (seq.num_computed_tokens + n) % self.config.block_size
        return n - past if n > past else n

    def _take_snapshots(self, out: SchedulerOutput) -> None:
        """Where a scheduled step ends one of a sequence's blocks, copy its state after the step
        into a snapshot slot (filed once the block's digest is known)."""
        snapshots = self.block_manager.snapshots
        if snapshots is None:
            return
        for seq, n in out.scheduled:
            end = seq.num_computed_tokens + n
            if end % self.config.block_size == 0:
                slot = snapshots.take(seq, end // self.config.block_size - 1)
                if slot is not None:
                    out.snapshots.append((seq.state_slot, slot))

    def wants_drafts(self) -> bool:
        """Whether a running sequence would draft now but for its newest token, still on its way
        to the host (asynchronous scheduling): drafting reads it, so the engine reads the step
        in flight back first."""
        return any(seq.is_pending() and not seq.draft_pause and self._draft_room(seq) for seq in self.running)

    def _draft_limit(self, seq: Sequence, budget: int) -> int:
        """How many tokens ``seq`` may draft: as many as the proposer allows and fit the budget,
        its ``max_tokens`` and ``max_model_len`` (every one might be kept). 0 while drafting
        pauses (a step counted) or while its newest token is still a placeholder."""
        room = self._draft_room(seq)
        if room and seq.draft_pause:
            seq.draft_pause -= 1
            return 0
        return 0 if seq.is_pending() else max(0, min(room, budget - 1))

    def _draft_room(self, seq: Sequence) -> int:
        """The most drafts ``seq`` could verify, budget aside: the proposer's limit, or fewer
        where its recent drafts were rejected (``seq.draft_limit``); 0 for a grammar's requests
        (their tokens must follow the grammar) and for one that does not draft."""
        if seq.grammar is not None:
            return 0
        limit = self.proposer.max_drafts(seq)
        if seq.draft_limit is not None:
            limit = min(limit, seq.draft_limit)
        return max(0, min(
            limit,
            seq.params.max_tokens - seq.num_output_tokens - 1,
            self.config.max_model_len - seq.num_tokens - 1,
        ))

    def _reached_length(self, seq: Sequence) -> bool:
        return (
            seq.num_output_tokens >= seq.params.max_tokens
            or seq.num_tokens >= self.config.max_model_len
        )

    def _prompt_blocks_to_compute(self, seq: Sequence) -> list[bytes]:
        """The digests of ``seq``'s full prompt blocks not computed yet (none without prefix
        caching): what a prompt sharing them would find in the cache once this step is done."""
        if not self.config.enable_prefix_caching:
            return []
        size = self.config.block_size
        return seq.block_hashes[seq.num_computed_tokens // size : seq.num_prompt_tokens // size]

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)

    def _give_back_slot(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self._free_slots.append(seq.state_slot)
            seq.state_slot = None

    def _release(self, seq: Sequence) -> None:
        self._give_back_slot(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.draft_kv_tokens = []
