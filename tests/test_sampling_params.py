"""Every invalid SamplingParams value is rejected with a message naming the field."""

import numpy as np
import pytest

from pico_vllm.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature must be >= 0, got -1"),
        (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
        (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
        (dict(top_p=None), "top_p must be a finite number, got None"),
        (dict(min_p=True), "min_p must be a finite number, got True"),
        (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\], got 1.01"),
        (dict(top_k=-1), r"top_k must be >= 0 \(0 = off\), got -1"),
        (dict(top_k=2.5), r"top_k must be >= 0 \(0 = off\), got 2.5"),
        (dict(min_p=2), r"min_p must be in \[0, 1\], got 2"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
        (dict(presence_penalty=3), r"presence_penalty must be in \[-2, 2\], got 3"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\], got -3"),
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(max_tokens=True), "max_tokens must be >= 1, got True"),
        (dict(max_tokens=4, min_tokens=5), r"min_tokens must be in \[0, max_tokens\], got 5"),
        (dict(min_tokens=-1), r"min_tokens must be in \[0, max_tokens\], got -1"),
        (dict(stop=3), "stop must be a str or a list of str, got 3"),
        (dict(stop=["ok", 1]), r"stop must be a str or a list of str, got \['ok', 1\]"),
        (dict(stop=[""]), "stop strings must not be empty"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids must be a list of non-negative ints, got \[-1\]"),
        (dict(stop_token_ids=7), "stop_token_ids must be a list of non-negative ints, got 7"),
        (dict(seed="x"), "seed must be an int or None, got 'x'"),
        (dict(logprobs=-1), r"logprobs must be None or an int in \[0, 20\], got -1"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingParams(**kwargs)


def test_defaults_and_normalization():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.stop, p.stop_token_ids) == (
        1.0, 1.0, 0, 0.0, 16, [], []
    )
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(3,)).stop_token_ids == [3]


def test_numpy_scalars_become_plain_python_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(4), seed=np.int64(-3))
    assert (p.temperature, p.top_k, p.seed) == (0.5, 4, -3)
    assert type(p.temperature) is float and type(p.top_k) is int and type(p.seed) is int
