"""Batched sampler: each row follows its own parameters; checked against numpy."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import pytest

from pico_vllm.layers.sampler import Sampler
from pico_vllm.sampling_params import SamplingParams

V = 16
EOS = 1


@dataclass
class Req:
    params: SamplingParams
    token_ids: list[int] = field(default_factory=lambda: [3, 4])
    num_prompt_tokens: int = 2

    @property
    def output_token_ids(self):
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens


def logits(rows: int = 1, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((rows, V)).astype(np.float32) * 3)


def test_greedy_is_argmax():
    x = logits(4)
    out = Sampler({EOS})(x, [Req(SamplingParams(temperature=0))] * 4)
    assert out.token_ids == np.argmax(np.array(x), axis=-1).tolist()
    assert out.logprobs is None


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)],
    ids=["top_k", "top_p", "min_p"],
)
def test_truncation_to_one_survivor_is_deterministic(params):
    x = logits(1, seed=5)
    sampler = Sampler({EOS}, seed=0)
    tokens = {sampler(x, [Req(SamplingParams(temperature=1.5, seed=s, **params))]).token_ids[0]
              for s in range(20)}
    assert tokens == {int(np.argmax(np.array(x)))}


def test_top_k_never_samples_outside_the_k_best():
    x = logits(1, seed=2)
    best3 = set(np.argsort(-np.array(x)[0])[:3].tolist())
    sampler = Sampler({EOS}, seed=1)
    seen = {sampler(x, [Req(SamplingParams(temperature=5.0, top_k=3))]).token_ids[0] for _ in range(60)}
    assert seen <= best3 and len(seen) > 1


def test_temperature_sampling_follows_softmax():
    x = logits(1, seed=3)
    probs = np.exp(np.array(x)[0] - np.array(x)[0].max())
    probs /= probs.sum()
    sampler = Sampler({EOS}, seed=4)
    draws = sampler(mx.repeat(x, 2000, axis=0), [Req(SamplingParams(temperature=1.0))] * 2000)
    freq = np.bincount(draws.token_ids, minlength=V) / 2000
    assert np.abs(freq - probs).max() < 0.05


def test_penalties_match_numpy():
    x = mx.array(np.linspace(-2, 2, V, dtype=np.float32)[None])
    req = Req(SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                             frequency_penalty=0.25), token_ids=[0, 15, 15, 15, 2])
    got = np.array(Sampler({EOS})._apply_penalties(x, [req]))[0]
    want = np.linspace(-2, 2, V, dtype=np.float32)
    for t in {0, 15, 2}:
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    want[15] -= 0.5 + 0.25 * 2  # in the output twice
    want[2] -= 0.5 + 0.25
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_min_tokens_blocks_eos_and_stop_tokens():
    x = mx.zeros((1, V))
    x[0, EOS] = 10.0
    x[0, 7] = 9.0
    x[0, 8] = 8.0
    sampler = Sampler({EOS})
    held = Req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7]))
    assert sampler(x, [held]).token_ids == [8]
    done = Req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7]), token_ids=[3, 4, 5, 6])
    assert sampler(x, [done]).token_ids == [EOS]


def test_seeded_rows_ignore_the_rest_of_the_batch():
    x = logits(3, seed=9)
    seeded = Req(SamplingParams(temperature=1.0, seed=42))
    alone = [Sampler({EOS}, seed=s)(x[1:2], [seeded]).token_ids[0] for s in range(5)]
    mixed = Sampler({EOS}, seed=99)(x, [Req(SamplingParams(temperature=1.0)), seeded,
                                         Req(SamplingParams(temperature=0))]).token_ids[1]
    assert set(alone) == {mixed}


def test_mixed_batch_rows_follow_their_own_params():
    x = logits(2, seed=11)
    out = Sampler({EOS}, seed=0)(x, [Req(SamplingParams(temperature=0)),
                                     Req(SamplingParams(temperature=1.0, top_k=1))])
    assert out.token_ids == np.argmax(np.array(x), axis=-1).tolist()


def test_logprobs_are_the_raw_log_softmax():
    x = logits(2, seed=12)
    out = Sampler({EOS})(x, [Req(SamplingParams(temperature=0, logprobs=3)),
                             Req(SamplingParams(temperature=0))])
    raw = np.array(x, np.float64)
    lsm = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
    assert out.logprobs[0] == pytest.approx(lsm[0].max(), abs=1e-5)
    assert [t for t, _ in out.top_logprobs[0]] == np.argsort(-lsm[0])[:3].tolist()
    assert out.top_logprobs[1] is None
