"""Speculative decoding (n-gram drafts verified in the batch) changes how many tokens a step
yields, never which: greedy and seeded requests equal the engine without speculation token for
token under every scheduling regime, unseeded ones follow the model's distribution, and rejected
drafts leave no trace in the pool or the prefix cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load

from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from pico_vllm.cli import build_parser, engine_config
from pico_vllm.config import SpeculativeConfig
from pico_vllm.engine.decode_graphs import DecodeGraphs
from pico_vllm.engine.scheduler import Scheduler
from pico_vllm.engine.sequence import Sequence
from pico_vllm.engine.speculative import MAX_PAUSE, DraftProposer, NgramProposer, accepted, after_verification
from tests.test_scheduler import AskedProposer

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def model(random_model):
    return str(random_model("llama", head_dim=32, seed=5))


def looping_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves, of lengths across block boundaries: the random model's
    greedy outputs fall into loops and copy the prompt, so drafts are both kept and rejected."""
    rng = np.random.default_rng(seed)
    prompts = []
    for n in (3, 8, 17, 30, 41):
        part = rng.integers(3, 250, size=n).tolist()
        prompts.append(part + part)
    return prompts


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], steps: dict | None = None):
    """Every request's final output; ``steps`` collects each one's new tokens, step by step."""
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            engine.scheduler.block_manager.check_invariants()
            if steps is not None:
                steps.setdefault(out.request_id, []).append(out.delta_token_ids)
            if out.finished:
                final[out.request_id] = out
    manager = engine.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    return [final[i] for i in ids]


def from_verification(steps: list[list[int]]) -> list[int]:
    """Output positions whose token a step yielded after another: sampled at a draft's position
    of a verified chunk (row 1 on), where an error in verification would show."""
    positions, start = [], 0
    for delta in steps:
        positions += range(start + 1, start + len(delta))
        start += len(delta)
    return positions


def same_outputs(plain: list, speculative: list) -> None:
    for a, b in zip(plain, speculative, strict=True):
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (
            a.token_ids, a.text, a.finish_reason, a.stop_reason), f"request {a.request_id} diverged"
        if a.logprobs is not None:
            np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
            for top_a, top_b in zip(a.top_logprobs, b.top_logprobs, strict=True):
                assert [t for t, _ in top_a] == [t for t, _ in top_b]


def plain_and_speculative(model: str, requests, speculative=NGRAM, **overrides):
    plain = LLMEngine(EngineConfig(model=model, **overrides))
    spec = LLMEngine(EngineConfig(model=model, speculative_config=speculative, **overrides))
    return run(plain, requests), run(spec, requests), spec


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("default (graphs, async requested)", dict(num_blocks=128)),
        ("eager", dict(num_blocks=128, enforce_eager=True)),
        ("chunked prefill, drafts cut to the budget", dict(num_blocks=128, max_num_batched_tokens=8)),
        ("preemption", dict(num_blocks=14, block_size=8, max_num_batched_tokens=32)),
        ("block_size 8", dict(num_blocks=256, block_size=8)),
        ("no prefix caching", dict(num_blocks=128, enable_prefix_caching=False)),
    ],
)
def test_greedy_with_drafts_equals_greedy_without(model, name, overrides):
    plain, spec, engine = plain_and_speculative(model, [(p, GREEDY) for p in looping_prompts()], **overrides)
    same_outputs(plain, spec)
    stats = engine.stats
    assert stats.accepted_draft_tokens > 0 and stats.draft_tokens > stats.accepted_draft_tokens
    # Kept drafts are tokens the step yields beyond one per sequence: fewer steps.
    assert stats.generated_tokens == 5 * 24
    if name == "preemption":
        assert stats.preemptions > 0
    if name.startswith("chunked"):
        assert engine.config.max_num_batched_tokens == 8


def test_async_scheduling_overlaps_the_steps_that_neither_verify_nor_draft(model):
    """A step is queued before the one in flight is read back only when that one verified no
    drafts and no sequence is about to draft: outputs stay exact, and paused drafting overlaps."""
    requests = [(p, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)) for p in looping_prompts()]
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=128)), requests)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=128, speculative_config=NGRAM))
    overlapped = []  # (the step drafts, the step in flight verified drafts) of each overlapped step
    execute = engine.runner.execute

    def recording(out, previous=None):
        if previous is not None:
            overlapped.append((bool(out.drafts), bool(previous.drafts)))
        return execute(out, previous)

    engine.runner.execute = recording
    # One request at a time: any sequence about to draft makes its step wait for the one before.
    same_outputs(plain, [run(engine, [request])[0] for request in requests])
    assert engine.stats.draft_tokens > engine.stats.accepted_draft_tokens > 0
    assert len(overlapped) > 5, "no step overlapped the one before"
    assert not any(drafts or verified for drafts, verified in overlapped)


class ReplayProposer(DraftProposer):
    """Drafts the continuation a plain engine produced, with every other draft run's last token
    changed: drafts are kept and rejected whatever the model (a random one rarely loops)."""

    def __init__(self, outputs: list, alter: bool = True) -> None:
        super().__init__(SpeculativeConfig(num_speculative_tokens=4))
        self.known = [o.prompt_token_ids + o.token_ids for o in outputs]
        self.calls, self.alter = 0, alter  # alter=False: every draft is the model's token

    def propose(self, seq: Sequence, k: int) -> list[int]:
        self.calls += 1
        token_ids = seq.token_ids
        for full in self.known:
            if full[: len(token_ids)] == token_ids:
                drafts = full[len(token_ids) : len(token_ids) + k]
                if drafts and self.alter and self.calls % 2:
                    drafts[-1] = (drafts[-1] + 1) % 500
                return drafts
        return []


def test_verified_chunks_run_through_captured_graphs_one_set_per_sequence(model, monkeypatch):
    """A step of decodes and drafts is decode-shaped: each verified position a row over the
    sequence up to itself, padded to a graph bucket and captured; cascade attention reads each
    verifying sequence's blocks once for all its rows. Token for token as without drafts."""
    calls = []  # (rows, cascade sets) of every captured step
    replay = DecodeGraphs.__call__

    def recording(graphs, *arrays):
        shared = arrays[7:]  # a SharedPrefix's arrays, the first its tables [G, S, NS]
        calls.append((arrays[0].shape[0], shared[0].shape[1] if shared else 0))
        return replay(graphs, *arrays)

    monkeypatch.setattr(DecodeGraphs, "__call__", recording)
    # Long prompts (6 whole blocks and more before every query), so each verifying sequence's
    # 1 + k rows save enough block reads to be a cascade set; every sequence drafts every step.
    requests = [(p * 3, GREEDY) for p in looping_prompts()[2:]]
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=128)), requests)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=128, speculative_config=NGRAM))
    engine.scheduler.proposer = ReplayProposer(plain, alter=False)
    calls.clear()
    same_outputs(plain, run(engine, requests))
    assert engine.stats.accepted_draft_tokens > 0
    verify_steps = [c for c in calls if c[0] > 3]  # more rows than the 3 sequences: drafts
    assert verify_steps, "no step with drafts ran through a captured graph"
    assert any(sets == 3 for _, sets in verify_steps), "verifying sequences were not cascade sets"


def test_sliding_window_mlx_lm_model_with_drafts_equals_without(random_model):
    """Gemma 3 through the mlx-lm adapter: windowed layers in their own layer group give blocks
    back while drafts are verified and rolled back."""
    model = str(random_model("gemma3_text", head_dim=32, seed=2))
    requests = [(p, GREEDY) for p in looping_prompts(seed=3)]
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8)), requests)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8, speculative_config=NGRAM))
    engine.scheduler.proposer = ReplayProposer(plain)
    same_outputs(plain, run(engine, requests))
    assert len(engine.runner.cache.layout.windows) == 2
    assert engine.stats.draft_tokens > engine.stats.accepted_draft_tokens > 60


def test_seeded_sampling_penalties_logprobs_and_min_tokens_are_unchanged(model):
    prompts = looping_prompts(seed=1)
    requests = [
        (prompts[0], SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)),
        (prompts[1], SamplingParams(temperature=0.5, top_p=0.9, top_k=20, seed=4, max_tokens=20,
                                    ignore_eos=True)),
        (prompts[2], SamplingParams(temperature=1.0, min_p=0.1, seed=5, max_tokens=20, ignore_eos=True)),
        (prompts[3], SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=20, ignore_eos=True)),
        (prompts[4], SamplingParams(temperature=0, logprobs=3, max_tokens=20, ignore_eos=True)),
        (prompts[2], SamplingParams(temperature=0, min_tokens=15, max_tokens=20)),
    ]
    plain, spec, engine = plain_and_speculative(model, requests, num_blocks=128)
    same_outputs(plain, spec)
    assert engine.stats.accepted_draft_tokens > 0


def test_stops_inside_a_kept_run_end_the_request_exactly_there(model):
    """EOS, a stop token, a stop string and max_tokens that fall inside a run of kept drafts end
    the request at that token, as they would one step at a time."""
    prompt = looping_prompts()[2]
    spec = LLMEngine(EngineConfig(model=model, num_blocks=128, speculative_config=NGRAM))
    steps = {}
    probe = run(spec, [(prompt, GREEDY)], steps)[0]
    tokens, text = probe.token_ids, probe.text
    inside = [p for p in from_verification(steps[probe.request_id]) if tokens.index(tokens[p]) == p]
    assert inside, "no token first appears inside a run of kept drafts"
    cut = inside[0]
    later = tokens[cut]
    max_tokens = from_verification(steps[probe.request_id])[-1]
    requests = [
        (prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[later], ignore_eos=True)),
        (prompt, SamplingParams(temperature=0, max_tokens=24, stop=[text[20:23]], ignore_eos=True)),
        (prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)),
        (prompt, SamplingParams(temperature=0, max_tokens=24)),  # stops at the EOS planted below
    ]
    plain = LLMEngine(EngineConfig(model=model, num_blocks=128))
    spec = LLMEngine(EngineConfig(model=model, num_blocks=128, speculative_config=NGRAM))
    for engine in (plain, spec):
        engine.eos_token_ids.add(later)
    expected, got = run(plain, requests), run(spec, requests)
    same_outputs(expected, got)
    assert [len(o.token_ids) for o in got] == [cut + 1, len(got[1].token_ids), max_tokens, cut + 1]
    assert [o.finish_reason for o in got] == ["stop", "stop", "length", "stop"]
    assert got[0].stop_reason == later and got[1].stop_reason is not None and got[3].stop_reason is None
    # The last step of each yielded several tokens: the stop fell inside a run of kept drafts.
    assert all(len(o.delta_token_ids) > 1 for o in got[::2]), [o.delta_token_ids for o in got]


def test_rejected_drafts_never_enter_the_prefix_cache(model):
    """Every cached block holds the tokens the sequence really has: after speculative runs, a
    plain engine's miss and the speculative engine's hit on the same outputs agree."""
    prompts = looping_prompts(seed=4)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=128, block_size=8, speculative_config=NGRAM))
    first = run(engine, [(p, GREEDY) for p in prompts])
    assert engine.stats.draft_tokens > engine.stats.accepted_draft_tokens > 0
    manager = engine.scheduler.block_manager
    for block in manager.blocks:
        if block.hash is not None:  # cached: its token ids must be a real prefix's block
            assert any(
                block.token_ids in {tuple((o.prompt_token_ids + o.token_ids)[i : i + 8])
                                    for i in range(0, len(o.prompt_token_ids + o.token_ids) - 7, 8)}
                for o in first
            ), block
    # Continuing each output from the cache gives what a fresh plain engine computes.
    follow = [(o.prompt_token_ids + o.token_ids, GREEDY) for o in first]
    hits = run(engine, follow)
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=128, block_size=8)), follow)
    same_outputs(plain, hits)
    assert engine.stats.cached_prompt_tokens > 0


def test_unseeded_sampling_with_drafts_follows_the_model_distribution(model):
    """Unseeded sampling (temperature 0.7, top-k 3): each token yielded from a verified chunk's
    draft positions is drawn from the model's own distribution given the tokens before it. The
    randomized probability integral transform of those tokens, against the exact probabilities of
    mlx-lm's forward pass, is uniform (chi-square over 10 bins, p = 0.001)."""
    engine = LLMEngine(EngineConfig(model=model, num_blocks=256, speculative_config=NGRAM, seed=11))
    params = SamplingParams(temperature=0.7, top_k=3, max_tokens=32, ignore_eos=True)
    prompts = looping_prompts(seed=5) * 12
    steps = {}
    outputs = run(engine, [(p, params) for p in prompts], steps)

    oracle, _ = mlx_lm_load(model)
    rng = np.random.default_rng(0)
    u = []
    for out in outputs:
        sequence = out.prompt_token_ids + out.token_ids
        logits = oracle(mx.array(sequence)[None])[0].astype(mx.float32) / 0.7
        kth = mx.sort(logits, axis=-1)[:, -3:-2]
        probs = np.array(mx.softmax(mx.where(logits >= kth, logits, -mx.inf), axis=-1))
        for i in from_verification(steps[out.request_id]):
            p, token = probs[len(out.prompt_token_ids) - 1 + i], out.token_ids[i]
            assert p[token] > 0, "a token outside the model's top-3 was kept"
            u.append(p[:token].sum() + rng.random() * p[token])
    assert len(u) >= 200
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    expected = len(u) / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.88, f"chi-square {chi2:.1f} over {len(u)} tokens: {counts}"


def test_drafting_pauses_after_failures_and_resumes_after_a_kept_draft():
    seq = Sequence("0", [1, 2, 3], SamplingParams())
    pauses = []
    for _ in range(7):
        after_verification(seq, drafted=3, kept=0)
        pauses.append(seq.draft_pause)
    assert pauses == [1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE]
    after_verification(seq, drafted=0, kept=0)  # a step without drafts changes nothing
    assert seq.draft_pause == MAX_PAUSE
    after_verification(seq, drafted=3, kept=1)
    assert (seq.draft_pause, seq.draft_failures) == (0, 0)


def test_a_sequence_drafts_two_more_after_all_were_kept_and_one_fewer_after_a_rejection():
    seq = Sequence("0", [1, 2, 3], SamplingParams(max_tokens=100))
    limits = []
    for drafted, kept in ((4, 4), (6, 6), (8, 3), (7, 0), (6, 1), (1, 0)):
        after_verification(seq, drafted, kept)
        limits.append(seq.draft_limit)
    assert limits == [6, 8, 7, 6, 5, 1]

    config = EngineConfig(num_blocks=16, block_size=8, max_model_len=128, speculative_config=NGRAM)
    scheduler = Scheduler(config, proposer=AskedProposer(config.speculative))
    seq = Sequence("1", [1, 2, 3], SamplingParams(max_tokens=100))
    scheduler.add_sequence(seq)
    scheduler.advance(scheduler.schedule(), [])  # the prompt
    seq.append_token(5)
    seq.draft_limit = 2
    assert scheduler.schedule().drafts[seq] == [4, 4]  # the limit, below num_speculative_tokens 4


def test_a_workload_without_repetition_drafts_little(model):
    """Random prompts, sampled at temperature 1: drafts rarely match and drafting pauses."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 500, size=40).tolist() for _ in range(4)]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True)
    plain, spec, engine = plain_and_speculative(model, [(p, params) for p in prompts], num_blocks=128)
    same_outputs(plain, spec)
    assert engine.stats.draft_tokens < 4 * 40  # far fewer than k per step


def test_the_proposer_continues_the_latest_occurrence_of_the_longest_suffix():
    propose = NgramProposer(SpeculativeConfig(prompt_lookup_max=3, prompt_lookup_min=2)).propose
    assert propose([5, 6, 7, 8, 9, 1, 6, 7, 8, 2, 3, 6, 7, 8], 3) == [2, 3, 6]  # 3-gram, latest
    assert propose([1, 7, 8, 4, 4, 4, 2, 7, 8, 5, 9, 9, 7, 8], 2) == [5, 9]
    assert propose([1, 2, 3, 4, 5, 1, 2], 4) == [3, 4, 5, 1]  # the 2-gram, since no 3-gram recurs
    assert propose([1, 2, 3, 4, 5, 6], 4) == []  # nothing recurs
    assert propose([4, 4, 4, 4], 4) == [4]  # a loop: the earliest occurrence has the most after it
    assert propose([9, 1, 2, 9, 1, 2, 9, 1], 4) == [2, 9, 1]
    assert NgramProposer(SpeculativeConfig(prompt_lookup_min=1)).propose([3, 1, 2, 3], 2) == [1, 2]


def test_accepted_keeps_the_agreeing_drafts_then_the_models_token():
    assert accepted([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accepted([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accepted([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert accepted([], [3]) == [3]


@pytest.mark.parametrize(
    "config,message",
    [
        ({"method": "eagle"}, "method 'eagle' is not supported"),
        ({"method": "draft_model"}, "goes with method 'draft_model', and only with it"),
        ({"method": "ngram", "model": "draft"}, "and only with it"),
        ({"model": 3}, "model must be a str, got 3"),
        ({"colour": "red"}, "unknown key"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an int >= 1, got 0"),
        ({"prompt_lookup_max": True}, "prompt_lookup_max must be an int >= 1"),
        ({"prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min must be <= prompt_lookup_max"),
        ([1], "speculative_config must be a dict, got list"),
    ],
)
def test_a_bad_speculative_config_is_refused_before_loading(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        EngineConfig(speculative_config=config)


def test_the_cli_takes_the_speculative_config_as_json(capsys):
    args = build_parser().parse_args(["generate", "--speculative-config", '{"num_speculative_tokens": 3}'])
    assert engine_config(args).speculative == SpeculativeConfig(num_speculative_tokens=3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--speculative-config", "[3]"])
    assert "expected a JSON object" in capsys.readouterr().err
