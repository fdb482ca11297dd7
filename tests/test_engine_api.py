"""The public API around the engine: bad input, streaming, stops, aborts, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_factory import make_random_model

from pico_vllm import LLM, EngineConfig, LLMEngine, SamplingParams
from pico_vllm.engine.llm_engine import SchedulerStats

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("api") / "llama", "llama", head_dim=32)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), num_blocks=64, max_model_len=256)


def finish_all(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def assert_serves(llm: LLM) -> None:
    """The engine still serves a valid request, and nothing leaked from the bad one."""
    out = llm.generate([5, 6, 7], GREEDY)[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    manager = llm.engine.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "prompt,params,error",
    [
        ("", GREEDY, "prompt is empty"),
        ([], GREEDY, "prompt is empty"),
        ([1, 2, 10**6], GREEDY, "outside the vocabulary"),
        ([1] * 300, GREEDY, "max_model_len"),
        ([1] * 200, SamplingParams(max_tokens=100), "max_model_len"),
        ([5, 6], SamplingParams(stop_token_ids=[10**9]), r"stop_token_ids \[1000000000\] are outside"),
        ({"text": "Hi"}, GREEDY, "a prompt dict must have exactly one key, 'prompt'"),
        (3.5, GREEDY, "prompt must be a str, a list of token ids or a prompt dict, got float"),
    ],
)
def test_bad_request_is_rejected_and_engine_keeps_serving(llm, prompt, params, error):
    with pytest.raises(ValueError, match=error):
        llm.generate([[3, 4], prompt], params)  # the valid first request is rolled back too
    assert_serves(llm)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(stop=42), "stop must be a str or a list of str, got 42"),
        (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number, got nan"),
        (dict(logprobs=10**6), r"logprobs must be None or an int in \[0, 20\], got 1000000"),
    ],
)
def test_bad_sampling_params_raise_naming_the_field(llm, kwargs, error):
    with pytest.raises(ValueError, match=error):
        llm.generate([1, 2], SamplingParams(**kwargs))
    assert_serves(llm)


def test_vllm_prompt_dicts_are_prompts(llm):
    by_text = llm.generate("Hi", GREEDY)[0]
    by_dict = llm.generate({"prompt": "Hi"}, GREEDY)[0]
    by_ids = llm.generate([{"prompt_token_ids": by_text.prompt_token_ids}], GREEDY)[0]
    assert by_dict.token_ids == by_ids.token_ids == by_text.token_ids
    assert by_dict.prompt == "Hi" and by_dict.prompt_token_ids == by_text.prompt_token_ids


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda llm: llm.generate(None), "prompts must be a str, .* got NoneType"),
        (lambda llm: llm.generate("Hi", {"max_tokens": 4}),
         "sampling_params must be a SamplingParams or a list of them, got dict"),
        (lambda llm: llm.apply_chat_template("hello"), "messages must be a non-empty list"),
        (lambda llm: llm.apply_chat_template([{"content": "hi"}]),
         'message 0 must be a dict with "role" and "content"'),
    ],
)
def test_wrong_types_at_the_front_door_name_the_problem(llm, call, error):
    with pytest.raises((TypeError, ValueError), match=error):
        call(llm)
    assert_serves(llm)


def test_request_needing_more_blocks_than_the_pool_is_rejected(model_dir):
    llm = LLM(str(model_dir), num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="blocks"):
        llm.generate([1] * 60, SamplingParams(max_tokens=10))
    assert_serves(llm)


def test_max_model_len_beyond_the_models_limit_is_an_error_not_a_silent_cap(model_dir):
    with pytest.raises(ValueError, match=r"max_model_len 4096 exceeds the model's limit of 1024 tokens"):
        LLM(str(model_dir), num_blocks=8, max_model_len=4096)
    assert LLM(str(model_dir), num_blocks=8, max_model_len=1024).engine.config.max_model_len == 1024


def test_missing_model_path_and_unsupported_architecture(tmp_path, model_dir):
    with pytest.raises((FileNotFoundError, ValueError), match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in model_dir.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = (odd / "config.json").read_text()
    (odd / "config.json").write_text(config.replace('"llama"', '"no_such_arch"'))
    with pytest.raises(ValueError, match="'no_such_arch': pico-vllm has no file for it .*llama.*mlx-lm"):
        LLM(str(odd))
    # mlx-lm has the architecture, but this config lacks the fields its arguments class needs.
    (odd / "config.json").write_text(config.replace('"llama"', '"gpt_bigcode"'))
    with pytest.raises(ValueError, match="mlx-lm's 'gpt_bigcode' model cannot be built from this "
                                         "config: .*missing .* required positional arguments"):
        LLM(str(odd))


def test_generate_accepts_text_and_token_prompts(llm):
    outs = llm.generate(["Hello", [1, 2, 3]], GREEDY)
    assert [o.prompt for o in outs] == ["Hello", None]
    assert outs[1].prompt_token_ids == [1, 2, 3]
    for out in outs:
        assert out.finished and len(out.token_ids) == 6
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stream_deltas_add_up_to_the_final_output(llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([[9, 8, 7]], params)[0]
    text, tokens = "", []
    for out in llm.stream([[9, 8, 7]], params):
        text += out.delta_text
        tokens += out.delta_token_ids
    assert (text, tokens) == (expected.text, expected.token_ids)


def test_stop_string_cuts_text_and_finishes(llm):
    full = llm.generate([[11, 12]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop = full.text[3:5]
    assert stop and stop in full.text
    out = llm.generate([[11, 12]], SamplingParams(temperature=0, max_tokens=12, stop=stop,
                                                  ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    streamed = "".join(
        o.delta_text
        for o in llm.stream([[11, 12]], SamplingParams(temperature=0, max_tokens=12, stop=stop,
                                                       ignore_eos=True))
    )
    assert streamed == out.text


def test_stop_token_ids_and_eos(llm):
    full = llm.generate([[21, 22]], GREEDY)[0]
    stop_token = full.token_ids[2]
    out = llm.generate(
        [[21, 22]], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_token], ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]


def test_abort_frees_blocks_and_other_requests_finish(llm):
    engine = llm.engine
    keep = engine.add_request([1, 2, 3], GREEDY)
    drop = engine.add_request([4, 5, 6] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
    emitted = {}
    while drop not in emitted:  # async scheduling hands a step's tokens out one step later
        emitted |= {o.request_id: o for o in engine.step()}
    final = engine.abort_request(drop)
    assert (final.finished, final.finish_reason) == (True, "abort")
    assert final.token_ids == emitted[drop].token_ids and final.delta_token_ids == []
    assert engine.abort_request(drop) is None
    outs = finish_all(engine)
    assert {o.request_id for o in outs} == {keep}
    assert_serves(llm)


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=1234, ignore_eos=True)
    a = llm.generate([[1, 2, 3]], params)[0].token_ids
    b = llm.generate([[7, 7], [1, 2, 3], [5]], params)[1].token_ids
    assert a == b


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                   ignore_eos=True))[0]
    assert len(out.logprobs) == len(out.top_logprobs) == 4
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert top[0][0] == token and top[0][1] == pytest.approx(lp)  # greedy picks the top-1
        assert len(top) == 3 and lp <= 0


def test_engine_config_validation():
    with pytest.raises(ValueError, match="block_size must be 8, 16 or 32, got 12"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="capture_graphs must be 'off', 'lazy' or 'startup', got 'eager'"):
        EngineConfig(capture_graphs="eager")
    with pytest.raises(ValueError, match="contradicts capture_graphs='startup'"):
        EngineConfig(enforce_eager=True, capture_graphs="startup")


def test_enforce_eager_is_vllms_name_for_capture_graphs_off():
    assert EngineConfig(enforce_eager=True).capture_graphs == "off"
    assert EngineConfig(capture_graphs="off").enforce_eager
    assert not EngineConfig(capture_graphs="startup").enforce_eager


def test_generate_shows_a_progress_bar_unless_told_not_to(llm, capsys):
    llm.generate([[1, 2], [3, 4]], GREEDY)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate([[1, 2], [3, 4]], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_reset_prefix_cache_makes_the_next_prompt_compute_its_blocks_again(llm):
    prompt = list(range(10, 60))  # 3 whole blocks of 16
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 48
    llm.reset_prefix_cache()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_scheduler_stats_count_what_runs_waits_and_holds_blocks_now(model_dir):
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=16, max_num_seqs=2, max_model_len=256))
    for i in range(3):
        engine.add_request(list(range(10 + i, 50 + i)), GREEDY)  # 40 tokens: 3 blocks each
    assert engine.scheduler_stats() == SchedulerStats(0, 3, 16, 0)
    engine.step()
    stats = engine.scheduler_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_blocks_used) == (2, 1, 6)
    finish_all(engine)
    assert engine.scheduler_stats() == SchedulerStats(0, 0, 16, 0)
