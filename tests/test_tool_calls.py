"""Tool calls: each family's format read back from real-shaped replies, written out, and held by
its grammar (a call that starts completes valid; forced calls are calls only); the reply reader's
streaming hold-back and reasoning split; the template rendering with and without tool support."""

from __future__ import annotations

import json

import pytest

from pico_vllm.loader import load
from pico_vllm.server.chat import ReplyReader, Turn, render, split_reasoning, tool_constraint
from pico_vllm.structured_outputs import GrammarCompiler, StructuredOutputsParams
from pico_vllm.tool_calls import PARSERS, Tool, ToolCall, parser_for, text_before

WEATHER = Tool("get_weather", "Current weather", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False})
ADD = Tool("add", "Sum", {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False})

# Replies as each family writes them (vLLM's parser tests and the model cards).
REPLIES = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
               "Let me check."),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "add", "parameters": {"a": 1, "b": 2}}', ""),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "add", "arguments": {"a": 1, "b": 2}}]', ""),
    "qwen3_coder": ("Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "</function>\n</tool_call>\n<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
                    "<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>", "Sure."),
    "openai": ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
               'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
               "<|start|>assistant<|channel|>commentary to=functions.add <|constrain|>json<|message|>"
               '{"a": 1, "b": 2}<|call|>', ""),
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_each_family_reads_its_calls_back(name):
    reply, content = REPLIES[name]
    text, calls = PARSERS[name]().parse(reply)
    assert text == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("name", list(PARSERS))
def test_a_written_call_reads_back_and_plain_text_is_no_call(name):
    parser = PARSERS[name]()
    _, calls = parser.parse(parser.render("add", {"a": 3, "b": 4}))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 3, "b": 4})]
    assert parser.parse("The weather is fine.") == ("The weather is fine.", [])
    broken = parser.render("add", {"a": 3, "b": 4}).replace("{", "(")  # not JSON any more
    assert parser.parse(broken)[1] == [] or name == "qwen3_coder"  # its values may be plain text


@pytest.fixture(scope="module")
def tokenizer():
    return load(None).tokenizer  # the embedded SmolLM2's: a real byte-level BPE vocabulary


@pytest.fixture(scope="module")
def follows(tokenizer):
    """``follows(lark, text)``: whether ``text``, tokenized, stays inside the grammar ``lark``."""
    grammars = GrammarCompiler(tokenizer, 49152, 2)

    def check(lark: str, text: str) -> bool:
        matcher = grammars.matcher(StructuredOutputsParams(grammar=lark))
        tokens = list(tokenizer.encode(text, add_special_tokens=False))
        return matcher.consume_tokens(tokens) and not matcher.is_error()

    return check


@pytest.mark.parametrize("name", list(PARSERS))
def test_the_grammars_hold_calls_to_their_schemas(follows, name):
    parser = PARSERS[name]()
    good = parser.render("get_weather", {"city": "Paris"})
    wrong_key = parser.render("get_weather", {"town": "Paris"})
    unknown = parser.render("get_time", {"city": "Paris"})
    forced = parser.grammar([WEATHER, ADD], forced=True, parallel=True, special=set())
    assert follows(forced, good)
    assert not follows(forced, wrong_key) and not follows(forced, unknown)
    assert not follows(forced, "No call.")  # required: calls only
    auto = parser.grammar([WEATHER, ADD], forced=False, parallel=True, special=set())
    if auto is None:  # Harmony: every message opens with the same marker, so auto is not held
        assert name == "openai"
        return
    assert follows(auto, "No call needed.") and follows(auto, good)
    assert not follows(auto, wrong_key)  # once a call starts, it must be valid
    if name in ("hermes", "qwen3_coder", "mistral"):
        assert follows(auto, "Let me look. " + good)
        assert not follows(auto, "Let me look. " + wrong_key)


def test_a_named_tool_choice_allows_that_tool_only(follows):
    parser = PARSERS["hermes"]()
    constraint = tool_constraint([WEATHER, ADD], "add", True, parser, set())
    assert follows(constraint.grammar, parser.render("add", {"a": 1, "b": 2}))
    assert not follows(constraint.grammar, parser.render("get_weather", {"city": "Rome"}))
    with pytest.raises(ValueError, match="tool_choice names 'nope', which is not among the tools"):
        tool_constraint([WEATHER], "nope", True, parser, set())
    assert tool_constraint([WEATHER], "none", True, parser, set()) is None


@pytest.mark.parametrize("template,expected", [
    ("{{ tools }}<tool_call>", "hermes"), ("[TOOL_CALLS] {{ tools }}", "mistral"),
    ("<|python_tag|>{{ tools }}", "llama3_json"), ("<tool_call><function=x><parameter=y>", "qwen3_coder"),
    ("<|channel|>", "openai"), (None, "hermes"),
])
def test_the_parser_follows_the_chat_template(template, expected):
    assert parser_for("llama", template).name == expected
    assert parser_for("gpt_oss", None).name == "openai"
    assert parser_for("qwen3", None, "mistral").name == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call parser 'xml'"):
        parser_for("qwen3", None, "xml")


def test_the_cli_lists_every_parser():
    from pico_vllm.cli import TOOL_CALL_PARSERS

    assert TOOL_CALL_PARSERS == tuple(PARSERS)


def test_a_template_without_tool_support_gets_the_default_tool_prompt_and_rendered_calls(tokenizer):
    parser = PARSERS["hermes"]()
    call = ToolCall("get_weather", '{"city": "Paris"}', "call_1")
    turns = [Turn("user", "Weather in Paris?"), Turn("assistant", "", [call]),
             Turn("tool", '{"temp": 21}', tool_call_id="call_1")]
    text = tokenizer.decode(render(tokenizer, turns, [WEATHER], parser))
    assert "<tools>" in text and '"name": "get_weather"' in text  # the default tool prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "tool\n{\"temp\": 21}" in text and text.endswith("<|im_start|>assistant\n")


def test_the_reader_holds_back_text_that_may_open_a_call_and_splits_reasoning():
    parser = PARSERS["hermes"]()
    reader = ReplyReader(parser, reasoning=True)
    stream = "<think>I should check.</think>Checking <tool_"
    assert reader.delta("<think>I should") == {"reasoning": "I should"}
    assert reader.delta("<think>I should check.</th") == {"reasoning": " check."}
    assert reader.delta(stream) == {"content": "Checking "}  # "<tool_" waits: it may open a call
    whole = stream + 'call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert reader.delta(whole) == {}
    rest, calls = reader.rest(whole)
    assert rest == "" and [c.name for c in calls] == ["get_weather"]
    assert split_reasoning("<think>a</think>\nb") == ("a", "b")
    assert split_reasoning("plain") == (None, "plain")
    assert text_before("abc<tool", "<tool_call>") == 3 and text_before("abc", "<tool_call>") == 3
