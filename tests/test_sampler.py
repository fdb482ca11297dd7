"""Batched sampler: each row follows its own parameters; checked against numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pico_vllm.engine.sequence import Sequence
from pico_vllm.layers.sampler import Sampler, SamplerOutput, _top_k_top_p
from pico_vllm.sampling_params import SamplingParams

V = 16
EOS = 1


def draw(sampler: Sampler, logits: mx.array, requests: list) -> SamplerOutput:
    """One sampling step, read back."""
    return sampler.sample(logits, requests).resolve()

def seq(output: tuple[int, ...] = (), prompt: tuple[int, ...] = (3, 4), **params) -> Sequence:
    """A request as the engine hands it to the sampler, ``output`` already generated."""
    s = Sequence("r", list(prompt), SamplingParams(**params))
    s.token_ids += list(output)
    return s


def logits(rows: int = 1, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((rows, V)).astype(np.float32) * 3)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def draws(x: mx.array, n: int, seed: int = 0, **params) -> list[int]:
    """``n`` independent samples from the one-row ``x``, drawn as one batch."""
    return draw(Sampler({EOS}, seed=seed), mx.repeat(x, n, axis=0), [seq(**params)] * n).token_ids


def test_greedy_is_bit_exact_argmax_even_with_logprobs():
    x = logits(4)
    argmax = np.argmax(np.array(x), axis=-1).tolist()
    out = draw(Sampler({EOS}), x, [seq(temperature=0)] * 4)
    assert out.token_ids == argmax and out.logprobs is None and out.top_logprobs == [None] * 4
    assert draw(Sampler({EOS}), x, [seq(temperature=0, logprobs=2)] * 4).token_ids == argmax


def allowed(x: np.ndarray, temperature: float, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """The tokens a truncated distribution keeps, computed the slow obvious way."""
    probs = softmax(x / temperature)
    order = np.argsort(-probs)
    keep = probs >= min_p * probs.max()
    if top_k:
        keep &= np.isin(np.arange(V), order[:top_k])
    if top_p < 1:
        kept_probs = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
        before = np.cumsum(kept_probs[order]) - kept_probs[order]
        keep &= np.isin(np.arange(V), order[(before < top_p) & keep[order]])
    return set(np.flatnonzero(keep).tolist())


@pytest.mark.parametrize(
    "params",
    [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=4, top_p=0.7, min_p=0.05)],
    ids=["top_k", "top_p", "min_p", "all_three"],
)
def test_truncation_never_samples_an_excluded_token(params):
    x = logits(1, seed=2)
    keep = allowed(np.array(x)[0], temperature=2.0, **params)
    assert 1 < len(keep) < V
    assert set(draws(x, 400, temperature=2.0, **params)) == keep  # each survivor drawn, nothing else


@pytest.mark.parametrize(
    "params", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)], ids=["top_k", "top_p", "min_p"]
)
def test_truncation_to_one_survivor_is_deterministic(params):
    x = logits(1, seed=5)
    assert set(draws(x, 50, temperature=1.5, **params)) == {int(np.argmax(np.array(x)))}


def test_top_p_is_measured_after_top_k():
    # Probabilities 0.4, 0.3, then 0.3 spread thin. Over all tokens the first holds 0.4 < 0.55, so
    # top_p=0.55 alone keeps two; renormalized over the top 2 it holds 0.57, so it stays alone.
    p = np.array([0.4, 0.3] + [0.3 / (V - 2)] * (V - 2))
    x = mx.repeat(mx.array(np.log(p).astype(np.float32)[None]), 400, axis=0)
    # One batch, so the top-p-only rows make the sampler look at the whole vocab for all rows.
    out = draw(Sampler({EOS}), x, [seq(top_p=0.55)] * 200 + [seq(top_k=2, top_p=0.55)] * 200).token_ids
    assert set(out[:200]) == {0, 1}
    assert set(out[200:]) == {0}


def test_top_k_keeps_exactly_k_and_leaves_untruncated_rows_whole():
    # The third token is so unlikely that float32 mass before it already rounds to 1.
    row = np.array([30.0, 0.0, -20.0] + [-40.0] * (V - 3), np.float32)
    kept = _top_k_top_p(mx.array(np.stack([row, row])), [SamplingParams(top_k=3), SamplingParams()])
    assert np.isfinite(np.array(kept)).sum(-1).tolist() == [3, V]


def test_temperature_sampling_follows_softmax():
    x = logits(1, seed=3)
    for temperature in (1.0, 2.0):
        freq = np.bincount(draws(x, 2000, seed=4, temperature=temperature), minlength=V) / 2000
        assert np.abs(freq - softmax(np.array(x)[0] / temperature)).max() < 0.05


def test_penalties_match_numpy():
    base = np.linspace(-2, 2, V, dtype=np.float32)
    x = mx.array(np.stack([base, base]))
    penalized = seq(prompt=(0, 15), output=(15, 15, 2), repetition_penalty=2.0,
                    presence_penalty=0.5, frequency_penalty=0.25)
    got = np.array(Sampler({EOS})._apply_penalties(x, [penalized, seq(output=(15,))]))
    want = base.copy()
    for t in (0, 15, 2):  # seen in prompt or output: positive halved, negative doubled
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    want[15] -= 0.5 + 0.25 * 2  # in the output twice
    want[2] -= 0.5 + 0.25 * 1
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    assert np.array_equal(got[1], base)  # a row without penalties is untouched


def test_penalties_steer_greedy():
    x = mx.array([[0.0, 0.0, 5.0, 4.0] + [-9.0] * (V - 4)])
    def greedy(**penalty) -> int:
        return draw(Sampler({EOS}), x, [seq(prompt=(0,), output=(2,), temperature=0, **penalty)]).token_ids[0]

    assert greedy() == 2
    assert greedy(repetition_penalty=1.3) == 3  # 5 / 1.3 < 4
    assert greedy(presence_penalty=1.5) == 3  # 5 - 1.5 < 4
    assert greedy(frequency_penalty=1.5) == 3


def test_min_tokens_blocks_eos_and_stop_tokens():
    x = mx.zeros((1, V))
    x[0, EOS], x[0, 7], x[0, 8] = 10.0, 9.0, 8.0
    sampler = Sampler({EOS})
    params = dict(temperature=0, min_tokens=2, stop_token_ids=[7, V + 5])  # V + 5: never drawable
    assert draw(sampler, x, [seq(output=(5,), **params)]).token_ids == [8]
    assert draw(sampler, x, [seq(output=(5,), ignore_eos=True, **params)]).token_ids == [EOS]
    assert draw(sampler, x, [seq(output=(5, 6), **params)]).token_ids == [EOS]
    sampled = draws(x, 100, temperature=1.0, min_tokens=1, stop_token_ids=[7])
    assert EOS not in sampled and 7 not in sampled


def test_seeded_rows_ignore_the_batch_and_its_order():
    x = logits(3, seed=9)
    seeded = seq(temperature=1.0, seed=42)
    alone = {draw(Sampler({EOS}, seed=s), x[1:2], [seeded]).token_ids[0] for s in range(8)}
    others = [seq(temperature=1.0), seq(temperature=0)]
    mixed = draw(Sampler({EOS}, seed=99), x, [others[0], seeded, others[1]]).token_ids[1]
    reordered = draw(Sampler({EOS}, seed=7), x[mx.array([1, 2, 0])], [seeded, others[1], others[0]])
    assert alone == {mixed} == {reordered.token_ids[0]}


def test_seeded_request_reproduces_whatever_the_step_batching():
    x = logits(1, seed=13)

    def generate(sampler: Sampler, companions: list[int]) -> list[int]:
        """Six steps of one seeded request, next to ``companions[step]`` unseeded ones."""
        request = seq(temperature=5.0, seed=7)
        for n in companions:
            rows = [request] + [seq(temperature=1.0)] * n
            request.token_ids.append(draw(sampler, mx.repeat(x, len(rows), axis=0), rows).token_ids[0])
        return request.output_token_ids

    first = generate(Sampler({EOS}, seed=0), [0, 0, 0, 0, 0, 0])
    assert generate(Sampler({EOS}, seed=3), [2, 0, 5, 1, 3, 0]) == first
    assert len(set(first)) > 1  # the step count feeds the key: not one token repeated


def test_different_seeds_draw_differently():
    x = logits(1, seed=14)
    assert draws(x, 64, seed=0) != draws(x, 64, seed=1)
    by_seed = [draw(Sampler({EOS}), x, [seq(seed=s)]).token_ids[0] for s in range(32)]
    assert len(set(by_seed)) > 1


def test_mixed_batch_rows_follow_their_own_params():
    x = logits(4, seed=11)
    raw = np.array(x)
    rows = [seq(temperature=0), seq(temperature=1.0, top_k=1), seq(temperature=2.0, seed=5),
            seq(prompt=(int(raw[3].argmax()),), temperature=0, repetition_penalty=100.0)]
    out = draw(Sampler({EOS}, seed=0), x, rows)
    assert out.token_ids[:2] == raw[:2].argmax(-1).tolist()
    assert out.token_ids[2] == draw(Sampler({EOS}, seed=1), x[2:3], [rows[2]]).token_ids[0]
    assert out.token_ids[3] == int(np.argsort(-raw[3])[1])  # the penalty sank the best token


def test_logprobs_are_the_raw_log_softmax():
    x = logits(3, seed=12)
    rows = [seq(temperature=0.5, repetition_penalty=1.5, output=(2,), logprobs=3),
            seq(temperature=0), seq(temperature=1.0, logprobs=0)]
    out = draw(Sampler({EOS}), x, rows)
    raw = np.array(x, np.float64)
    lsm = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, lsm[[0, 1, 2], out.token_ids], atol=1e-5)
    top = np.argsort(-lsm[0])[:3]
    assert [t for t, _ in out.top_logprobs[0]] == top.tolist()
    np.testing.assert_allclose([lp for _, lp in out.top_logprobs[0]], lsm[0][top], atol=1e-5)
    assert out.top_logprobs[1] is None and out.top_logprobs[2] == []


def test_logits_must_match_the_batch():
    message = r"logits must have shape \[len\(requests\)=2, vocab\], got \(3, 16\)"
    with pytest.raises(ValueError, match=message):
        draw(Sampler({EOS}), logits(3), [seq(), seq()])


def test_each_stage_names_the_rows_it_changes_and_the_shortcuts_follow():
    sampler = Sampler({EOS})
    assert [stage.name for stage in sampler.stages] == ["penalties", "grammar", "min_tokens"]
    plain = seq(temperature=0)
    assert sampler.is_plain_argmax([plain]) and not sampler.reads_token_ids(plain)
    # Each of these changes a greedy row's logits (or its output), so the argmax shortcut is off;
    # only penalties read earlier token ids on the host.
    for request, reads in [(seq(temperature=0, presence_penalty=1.0), True),
                           (seq(temperature=0, min_tokens=3), False),
                           (seq(temperature=0, logprobs=2), False),
                           (seq(temperature=0.5), False)]:
        assert not sampler.is_plain_argmax([plain, request]), request.params
        assert sampler.reads_token_ids(request) == reads, request.params
    # A stage a batch does not use leaves its logits bit-exact: the greedy rows' argmax.
    x = logits(4)
    assert draw(sampler, x, [plain] * 4).token_ids == np.argmax(np.array(x), axis=-1).tolist()
