"""Scheduler: token budget, chunked prefill, decode-first order, preemption, rejection — and a
hypothesis state machine checking the block accounting under random add/abort/step schedules."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pico_vllm.config import EngineConfig
from pico_vllm.engine.scheduler import Scheduler
from pico_vllm.engine.sequence import Sequence, SequenceStatus
from pico_vllm.engine.speculative import DraftProposer, after_verification
from pico_vllm.sampling_params import SamplingParams


def make(num_blocks=16, block_size=8, budget=32, max_seqs=8, max_len=128, caching=True, snapshots=0):
    return Scheduler(EngineConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
        max_num_seqs=max_seqs, max_model_len=max_len, enable_prefix_caching=caching,
        num_state_snapshots=snapshots,
    ))


def seq(n: int, name: str, max_tokens: int = 4, start: int = 0) -> Sequence:
    return Sequence(name, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def step(s: Scheduler, token: int = 7):
    """One engine step with a fake model that samples ``token`` wherever a sequence samples."""
    out = s.schedule()
    sampled = [seq for seq, n in out.scheduled if seq.num_computed_tokens + n == seq.num_tokens]
    s.advance(out, sampled)
    for seq in sampled:
        s.tokens_known(seq, seq.num_tokens - 1, [token])
    for seq, _ in out.scheduled:
        if seq.num_output_tokens >= seq.params.max_tokens:
            s.finish(seq)
    return out


def test_long_prompt_is_chunked_under_the_budget():
    s = make(budget=8)
    a = seq(20, "a")
    s.add_sequence(a)
    chunks = [step(s).scheduled[0][1] for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert a.num_output_tokens == 1 and a.num_computed_tokens == 20


def test_decodes_go_first_and_waiting_prompts_fill_the_rest():
    s = make(budget=10)
    a = seq(6, "a")
    s.add_sequence(a)
    step(s)  # a prefilled, sampled its first token
    b, c = seq(12, "b", start=100), seq(3, "c", start=200)
    s.add_sequence(b)
    s.add_sequence(c)
    out = step(s)
    assert [(x.request_id, n) for x, n in out.scheduled] == [("a", 1), ("b", 9)]
    out = step(s)  # b finishes its prompt (3 tokens), c gets the rest of the budget
    assert [(x.request_id, n) for x, n in out.scheduled] == [("a", 1), ("b", 3), ("c", 3)]
    assert out.num_batched_tokens == 7


def test_prompts_sharing_a_prefix_in_flight_wait_one_step_and_then_all_hit_the_cache():
    s = make(budget=64)
    system = list(range(500, 516))  # two full blocks of 8
    a = Sequence("a", system + [1, 2, 3], SamplingParams(max_tokens=4))
    b = Sequence("b", system + [4, 5], SamplingParams(max_tokens=4))
    c = Sequence("c", system + [6, 7, 8, 9, 10, 11, 12, 13, 14], SamplingParams(max_tokens=4))
    other = seq(12, "other", start=100)
    for x in (a, b, c, other):
        s.add_sequence(x)
    out = step(s)
    assert [x.request_id for x, _ in out.scheduled] == ["a"]  # b waits for a's prefix (FIFO)
    out = step(s)  # b's own tokens do not hold c back: c shares only the cached blocks with it
    assert [(x.request_id, n) for x, n in out.scheduled] == [("a", 1), ("b", 2), ("c", 9), ("other", 12)]
    assert b.num_cached_tokens == c.num_cached_tokens == 16
    s.block_manager.check_invariants()


def test_a_prompt_waits_while_its_next_block_past_the_cache_is_being_computed():
    s = make(budget=24, num_blocks=32)
    system = list(range(500, 540))  # five blocks of 8: a computes three, then two and its last token
    a = Sequence("a", system + [1], SamplingParams(max_tokens=4))
    b = Sequence("b", system + [2], SamplingParams(max_tokens=4))
    for x in (a, b):
        s.add_sequence(x)
    assert [(x.request_id, n) for x, n in step(s).scheduled] == [("a", 24)]
    out = step(s)  # b would hit 3 blocks, but a is computing b's 4th and 5th right now
    assert [(x.request_id, n) for x, n in out.scheduled] == [("a", 17)]
    assert b.num_cached_tokens == 0 and not any(b.block_tables)  # its hits were given back
    out = step(s)
    assert [(x.request_id, n) for x, n in out.scheduled] == [("a", 1), ("b", 1)]
    assert b.num_cached_tokens == 40
    s.block_manager.check_invariants()


def test_without_prefix_caching_nothing_waits_for_a_prefix():
    s = make(budget=64, caching=False)
    system = list(range(500, 516))
    for name in "ab":
        s.add_sequence(Sequence(name, system + [1], SamplingParams(max_tokens=4)))
    assert [x.request_id for x, _ in step(s).scheduled] == ["a", "b"]


def test_a_config_without_the_pools_size_is_refused():
    with pytest.raises(ValueError, match="num_blocks and max_model_len set"):
        Scheduler(EngineConfig(max_model_len=128))


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2)
    for i in range(3):
        s.add_sequence(seq(2, f"r{i}", start=10 * i))
    out = step(s)
    assert [x.request_id for x, _ in out.scheduled] == ["r0", "r1"]
    assert s.num_waiting == 1


def test_preempts_the_most_recent_and_requeues_it_at_the_front():
    s = make(num_blocks=4, block_size=8, budget=64)
    a, b = seq(15, "a", max_tokens=10), seq(15, "b", max_tokens=10, start=50)
    s.add_sequence(a)
    s.add_sequence(b)
    step(s)  # a and b take 2 blocks each; both sampled (16 tokens known, 15 computed)
    step(s)  # the 16th tokens still fit their second blocks
    out = step(s)  # the 17th need a third block each: only one is left to find
    assert out.preempted == [b]
    assert b.status is SequenceStatus.PREEMPTED and b.block_table == []
    assert b.num_computed_tokens == 0
    assert s.waiting[0] is b
    assert [x.request_id for x, _ in out.scheduled] == ["a"]
    s.block_manager.check_invariants()


def test_recompute_after_preemption_hits_the_prefix_cache():
    s = make(num_blocks=4, block_size=8, budget=64)
    a, b = seq(15, "a", max_tokens=10), seq(15, "b", max_tokens=10, start=50)
    s.add_sequence(a)
    s.add_sequence(b)
    for _ in range(3):
        step(s)  # b is preempted in the third step
    s.finish(a)
    out = step(s)
    assert out.scheduled[0][0] is b
    # b's tail block was recycled for a's third block; its head came back from the cache.
    assert b.num_cached_tokens == 8
    assert out.scheduled[0][1] == b.num_tokens - 1 - 8  # (the step then sampled one more)


def test_request_that_can_never_fit_is_rejected_at_add():
    s = make(num_blocks=4, block_size=8, max_len=100)
    with pytest.raises(ValueError, match=r"prompt \(90 tokens\) \+ max_tokens \(20\) = 110 exceeds "
                                         r"max_model_len \(100\)"):
        s.add_sequence(seq(90, "a", max_tokens=20))
    with pytest.raises(ValueError, match="needs 5 KV blocks for 34 tokens, but the pool has only 4"):
        s.add_sequence(seq(30, "b", max_tokens=4))
    assert not s.has_unfinished()


def test_abort_frees_waiting_and_running():
    s = make()
    s.add_sequence(seq(5, "a"))
    s.add_sequence(seq(5, "b", start=9))
    step(s)
    s.add_sequence(seq(5, "c", start=40))
    assert s.abort("a") and s.abort("c")
    assert not s.abort("a") and not s.abort("zzz")
    assert [x.request_id for x in s.running] == ["b"] and s.num_waiting == 0


class RandomSchedules(RuleBasedStateMachine):
    """Random adds (with shared prefixes), aborts and steps on a tiny pool."""

    def __init__(self) -> None:
        super().__init__()
        self.s = make(num_blocks=10, block_size=8, budget=12, max_seqs=4, max_len=80)
        self.count = 0

    @rule(length=st.integers(1, 48), max_tokens=st.integers(1, 12), prefix=st.sampled_from([0, 1]))
    def add(self, length, max_tokens, prefix):
        tokens = [prefix] * 8 + list(range(self.count, self.count + length))
        self.count += 1
        s = Sequence(f"r{self.count}", tokens[: max(length, 1)], SamplingParams(max_tokens=max_tokens))
        try:
            self.s.add_sequence(s)
        except ValueError:
            assert s.num_tokens + max_tokens > 80

    @precondition(lambda self: self.s.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        live = [x.request_id for x in (*self.s.running, *self.s.waiting)]
        assert self.s.abort(data.draw(st.sampled_from(live)))

    @rule()
    def one_step(self):
        before = self.s.has_unfinished()
        out = step(self.s, token=3)
        assert out.num_batched_tokens <= 12
        assert not before or out.scheduled or out.preempted  # always makes progress

    @invariant()
    def accounting(self):
        m = self.s.block_manager
        m.check_invariants()
        live = [*self.s.running, *self.s.waiting]
        refs = {}
        for x in live:
            for b in x.block_table:
                refs[b] = refs.get(b, 0) + 1
        assert all(m.blocks[b].ref_count == n for b, n in refs.items())
        assert sum(1 for b in m.blocks if b.ref_count) == len(refs)

    def teardown(self):
        for _ in range(500):
            if not self.s.has_unfinished():
                break
            step(self.s)
        assert not self.s.has_unfinished()
        m = self.s.block_manager
        m.check_invariants()
        assert m.num_free_blocks == m.num_blocks  # no leak: all free or reclaimable


TestRandomSchedules = RandomSchedules.TestCase
TestRandomSchedules.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


class AskedProposer(DraftProposer):
    """Drafts as many tokens as the scheduler asks for (their values do not matter here)."""

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return [4] * k


class RandomSchedulesWithDrafts(RandomSchedules):
    """The same random schedules with speculative decoding: sequences draft up to 3 tokens a
    step and each verification keeps a random number of them, rolling the rest back."""

    def __init__(self) -> None:
        super().__init__()
        config = replace(self.s.config, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
        self.s = Scheduler(config, proposer=AskedProposer(config.speculative))

    @rule(data=st.data())
    def one_step(self, data):
        before = self.s.has_unfinished()
        out = self.s.schedule()
        assert out.num_batched_tokens <= 12
        assert not before or out.scheduled or out.preempted
        sampled = [x for x, n in out.scheduled
                   if x.num_computed_tokens + n == x.num_tokens + len(out.drafts.get(x, ()))]
        self.s.advance(out, sampled)
        for x in sampled:
            drafts = out.drafts.get(x, [])
            kept = data.draw(st.integers(0, len(drafts)))
            self.s.tokens_known(x, x.num_tokens - 1, drafts[:kept] + [3], num_rejected=len(drafts) - kept)
            after_verification(x, len(drafts), kept)
            assert x.num_output_tokens <= x.params.max_tokens  # drafts never overshoot max_tokens
            assert x.num_computed_tokens == x.num_tokens - 1  # the rejected drafts' K/V rolled back
            if x.num_output_tokens == x.params.max_tokens:
                self.s.finish(x)


TestRandomSchedulesWithDrafts = RandomSchedulesWithDrafts.TestCase
TestRandomSchedulesWithDrafts.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


class RandomHybridSchedules(RandomSchedules):
    """The same random schedules for a hybrid model with 3 state snapshots, run by a fake
    recurrence whose state is the very tokens it has read: after every step, each running
    sequence's state slot holds exactly its computed tokens, however it got there (from scratch,
    chunk by chunk, or resumed from a snapshot another sequence left)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = make(num_blocks=10, block_size=8, budget=12, max_seqs=4, max_len=80, snapshots=3)
        self.slots: dict[int, tuple[int, ...]] = {}  # state slot -> the tokens its state has read

    @rule()
    def one_step(self):
        out = self.s.schedule()
        for source, target in out.restores:
            self.slots[target] = self.slots[source]
        for x, n in out.scheduled:
            start = x.num_computed_tokens
            if start == 0:
                self.slots[x.state_slot] = ()
            assert self.slots[x.state_slot] == tuple(x.token_ids[:start]), "resumed from a wrong state"
            self.slots[x.state_slot] += tuple(x.token_ids[start : start + n])
            if n > 1 and (start + n) // 8 > start // 8:  # a boundary inside: the chunk ends on it
                assert (start + n) % 8 == 0, (start, n)
        for source, target in out.snapshots:
            assert len(self.slots[source]) % 8 == 0
            self.slots[target] = self.slots[source]
        sampled = [x for x, n in out.scheduled if x.num_computed_tokens + n == x.num_tokens]
        self.s.advance(out, sampled)
        for x in sampled:
            self.s.tokens_known(x, x.num_tokens - 1, [3])
        for x, _ in out.scheduled:
            if x.num_output_tokens >= x.params.max_tokens:
                self.s.finish(x)


TestRandomHybridSchedules = RandomHybridSchedules.TestCase
TestRandomHybridSchedules.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_a_hybrid_hit_resumes_only_where_a_snapshot_is():
    s = make(budget=64, snapshots=2)
    system = list(range(500, 520))  # 2 full blocks of 8, and 4 tokens more
    a = Sequence("a", system + [1], SamplingParams(max_tokens=1))
    s.add_sequence(a)
    assert [n for _, n in step(s).scheduled] == [16]  # cut at the last full block: a snapshot there
    assert [n for _, n in step(s).scheduled] == [5]
    b = Sequence("b", system + [2, 3], SamplingParams(max_tokens=1))
    c = Sequence("c", system[:12] + [4] * 9, SamplingParams(max_tokens=1))  # shares 1 block + 4 tokens
    s.add_sequence(b)
    s.add_sequence(c)
    out = step(s)
    assert (b.num_cached_tokens, c.num_cached_tokens) == (16, 0)  # no snapshot after c's 1st block
    assert [source for source, _ in out.restores] == [8]  # after max_num_seqs (8) sequences' slots
    s.block_manager.check_invariants()
