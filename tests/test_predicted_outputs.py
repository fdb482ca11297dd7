"""Predicted Outputs (``SamplingParams.prediction``): the client's expected output is a draft
source verified like n-gram drafts, so a good prediction takes several tokens per step and any
prediction leaves the output as it is without one, on an engine with or without speculation."""

from __future__ import annotations

import numpy as np
import pytest

from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from pico_vllm.config import SpeculativeConfig
from pico_vllm.engine.sequence import Sequence
from pico_vllm.engine.speculative import PREDICTION_DRAFT_TOKENS, DraftProposer
from tests.test_speculative import NGRAM, looping_prompts, run, same_outputs

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def model(random_model):
    return str(random_model("llama", head_dim=32, seed=5))


def prompts(seed: int = 1) -> list[list[int]]:
    """Prompts that do not repeat: a random model's outputs give n-gram lookup little to copy."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=n).tolist() for n in (5, 12, 23, 31)]


def with_prediction(params: SamplingParams, prediction: list[int]) -> SamplingParams:
    return SamplingParams(**{**vars(params), "prediction": prediction})


def edited(tokens: list[int]) -> list[int]:
    """A prediction that is mostly right: a token changed, one inserted, two deleted."""
    out = list(tokens)
    out[5] = (out[5] + 1) % 250
    out.insert(15, 7)
    del out[25:27]
    return out


def test_a_right_prediction_is_kept_whole_and_takes_fewer_steps(model):
    requests = [(p, GREEDY) for p in prompts()]
    plain_engine = LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8))
    plain = run(plain_engine, requests)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8))
    predicted = run(engine, [(p, with_prediction(GREEDY, o.token_ids)) for (p, _), o in zip(requests, plain)])
    same_outputs(plain, predicted)
    for out in predicted:
        # After the prefill's token, 4 steps of 8 drafts + 1, then one of 2 + 1 (max_tokens): 40.
        assert PREDICTION_DRAFT_TOKENS == 8
        assert out.num_draft_tokens == out.num_accepted_draft_tokens == 4 * 8 + 2
    assert engine.stats.steps < plain_engine.stats.steps / 3


def test_a_wrong_prediction_changes_nothing_and_is_followed_again_after_the_edit(model):
    requests = [(p, GREEDY) for p in prompts()]
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8)), requests)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8))
    predictions = [edited(o.token_ids) for o in plain]
    predicted = run(engine, [(p, with_prediction(GREEDY, pr)) for (p, _), pr in zip(requests, predictions)])
    same_outputs(plain, predicted)
    for out in predicted:
        assert out.num_accepted_draft_tokens < out.num_draft_tokens
        assert out.num_accepted_draft_tokens >= 20  # drafting picked the prediction up after each edit


@pytest.mark.parametrize("speculative", [None, NGRAM], ids=["async engine", "ngram engine"])
def test_requests_with_and_without_predictions_in_one_batch_sample_what_they_would_alone(model, speculative):
    """Seeded sampling, half the requests predicted (wrongly in part), chunked prefill: the steps
    that carry a prediction run synchronously, the others as the engine runs them."""
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30) for i in range(6)]
    requests = list(zip(looping_prompts(seed=4) + prompts(seed=2)[:1], params))
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8)), requests)
    mixed = [(p, with_prediction(sp, edited(o.token_ids + [1] * 30)) if i % 2 else sp)
             for i, ((p, sp), o) in enumerate(zip(requests, plain))]
    engine = LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8, max_num_batched_tokens=16,
                                    speculative_config=speculative))
    same_outputs(plain, run(engine, mixed))
    assert engine.stats.accepted_draft_tokens > 0


def test_the_proposer_follows_the_prediction_and_resumes_after_an_edit():
    proposer = DraftProposer(None)
    seq = Sequence("0", [100, 101], SamplingParams())
    assert proposer.max_drafts(seq) == 0  # no speculation and no prediction: no drafts
    seq.prediction = [1, 2, 3, 4, 5, 6, 1, 2, 8, 9]
    assert proposer.max_drafts(seq) == PREDICTION_DRAFT_TOKENS
    assert proposer.propose(seq, 3) == [1, 2, 3]  # nothing out yet: the prediction's start
    seq.token_ids += [1, 2, 3]
    assert proposer.propose(seq, 3) == [4, 5, 6]  # on track
    seq.token_ids += [4, 7, 6, 1, 2]  # off track ("7" for "5"), then back: "6 1 2" occurs once
    assert proposer.propose(seq, 3) == [8, 9]
    seq.token_ids[-3:] = [9, 1, 2]  # "1 2" occurs twice: the occurrence nearest the same offset
    assert proposer.propose(seq, 2) == [8, 9]
    seq.token_ids[2:] = [7, 1, 2]  # the same "1 2", three tokens out: the first occurrence
    assert proposer.propose(seq, 2) == [3, 4]
    seq.token_ids += [50, 51]
    assert proposer.propose(seq, 2) == []  # nothing of the prediction matches
    assert DraftProposer(SpeculativeConfig(num_speculative_tokens=3)).max_drafts(seq) == 3
    # Where the prediction has nothing, an engine with n-gram speculation drafts from the tokens.
    seq.token_ids[2:] = [60, 61, 62, 60, 61]
    assert proposer.propose(seq, 3) == []
    assert DraftProposer(SpeculativeConfig(num_speculative_tokens=3)).propose(seq, 3) == [62, 60, 61]


def test_bad_predictions_are_errors_naming_the_field(model):
    with pytest.raises(ValueError, match="prediction must be a str, a list of token ids or None"):
        SamplingParams(prediction=5)
    with pytest.raises(ValueError, match="prediction must be"):
        SamplingParams(prediction=[1, "a"])
    engine = LLMEngine(EngineConfig(model=model, num_blocks=32, block_size=8))
    with pytest.raises(ValueError, match=r"prediction token ids \[100000\] are outside the vocabulary"):
        engine.add_request([1, 2, 3], SamplingParams(prediction=[4, 100000]))
    assert not engine.has_unfinished_requests()


def test_a_text_prediction_is_kept_with_a_real_tokenizer():
    """The embedded SmolLM2 asked to repeat code, the code as the prediction: text, tokenized
    apart from the reply (which drops a line of it), and still mostly kept."""
    from pico_vllm import LLM

    llm = LLM(max_model_len=512, num_blocks=64)
    code = "def add(a, b):\n    result = a + b\n    return result\n\n\nprint(add(2, 3))\n"
    question = [{"role": "user", "content": f"Repeat this Python code exactly:\n{code}"}]
    greedy = SamplingParams(temperature=0, max_tokens=48)
    plain = llm.chat(question, greedy, use_tqdm=False)[0]
    predicted = llm.chat(question, with_prediction(greedy, code), use_tqdm=False)[0]
    assert (predicted.token_ids, predicted.text) == (plain.token_ids, plain.text)
    assert predicted.num_accepted_draft_tokens >= len(plain.token_ids) // 2, plain.text
    assert predicted.num_draft_tokens > predicted.num_accepted_draft_tokens  # a line left out
