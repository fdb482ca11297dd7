"""Every invalid SamplingParams value is rejected with a message naming the field."""

import pytest

from pico_vllm.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature must be >= 0, got -1"),
        (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\], got 1.01"),
        (dict(top_k=-1), r"top_k must be >= 0 \(0 = off\), got -1"),
        (dict(min_p=2), r"min_p must be in \[0, 1\], got 2"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
        (dict(presence_penalty=3), r"presence_penalty must be in \[-2, 2\], got 3"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\], got -3"),
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(max_tokens=4, min_tokens=5), r"min_tokens must be in \[0, max_tokens\], got 5"),
        (dict(stop=3), "stop must be a str or a list of str, got 3"),
        (dict(stop=["ok", 1]), "stop must be a str or a list of str"),
        (dict(stop=[""]), "stop strings must not be empty"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of non-negative ints"),
        (dict(seed="x"), "seed must be an int or None, got 'x'"),
        (dict(logprobs=-1), "logprobs must be None or an int >= 0, got -1"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_string_is_normalized_to_a_list():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams().stop == [] and SamplingParams(temperature=0).greedy
