"""A chat turn with tools, for both APIs (OpenAI's chat completions, Anthropic's messages).

Each API turns its request into the same pieces: ``Turn`` messages (text, the assistant's earlier
tool calls, tool results), the ``Tool`` list and a tool choice. From them:

- ``render`` builds the prompt through the model's chat template, passing ``tools=`` where the
  template takes them, else a default tool prompt (the Hermes format) in the system message;
- ``tool_constraint`` holds the output to the call format where ``tool_choice`` demands a call
  (``required``, a named tool) and arms the lazy call grammar for ``auto``;
- ``ReplyReader`` reads a reply back, whole or streamed: answer text, reasoning
  (``<think>...</think>``, with ``--reasoning-parser``) and tool calls, each delta routed where
  it belongs, text that may open a call held back until it is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pico_vllm.structured_outputs import StructuredOutputsParams
from pico_vllm.tool_calls import (
    Tool,
    ToolCall,
    ToolCallParser,
    default_tool_prompt,
    template_takes_tools,
    text_before,
)

REASONING_PARSERS = ("think",)  # <think>...</think> (DeepSeek-R1, Qwen3, SmolLM3)


@dataclass
class Turn:
    """One message of a conversation, in neither API's shape."""

    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


def render(tokenizer, turns: list[Turn], tools: list[Tool], parser: ToolCallParser) -> list[int]:
    """The conversation's prompt token ids, ready for the reply; ValueError without a template."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError("this model's tokenizer has no chat template")
    native = template_takes_tools(template)
    messages = []
    for turn in turns:
        message: dict = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            if native:  # HF templates read the arguments as a mapping
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": json.loads(c.arguments)}} for c in turn.tool_calls]
            else:
                rendered = "\n".join(parser.render(c.name, json.loads(c.arguments)) for c in turn.tool_calls)
                message["content"] = "\n".join(filter(None, [turn.content, rendered]))
        if turn.tool_call_id is not None:
            message["tool_call_id"] = turn.tool_call_id
        messages.append(message)
    if tools and not native:
        prompt = default_tool_prompt(tools, parser)
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    kwargs = {"tools": [t.as_openai() for t in tools]} if tools and native else {}
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))


def tool_constraint(tools: list[Tool], choice: str, parallel: bool, parser: ToolCallParser,
                    special: set[str]) -> StructuredOutputsParams | None:
    """The output constraint ``choice`` asks for: ``none`` none, ``auto`` the lazy call grammar,
    ``required`` calls only, or a tool's name: calls of that tool only."""
    if not tools or choice == "none":
        return None
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t.name == choice]
        if not tools:
            raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
    grammar = parser.grammar(tools, forced=choice != "auto", parallel=parallel, special=special)
    return None if grammar is None else StructuredOutputsParams(grammar=grammar)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, answer)``: what a reply wrote inside ``<think>...</think>`` before its answer.
    A reply still thinking (no ``</think>`` yet) is all reasoning."""
    body = text.removeprefix("<think>")
    reasoning, marker, answer = body.partition("</think>")
    if not marker:
        return (body, "") if text.startswith("<think>") else (None, text)
    return reasoning.strip(), answer.lstrip()


class ReplyReader:
    """Reads one reply (a choice) as it streams: ``delta(text_so_far)`` gives what to send next,
    ``final(text)`` the whole reply's parts. Answer text that could open a tool call waits until
    the call's trigger shows up or cannot any more."""

    def __init__(self, parser: ToolCallParser | None, reasoning: bool) -> None:
        self.parser, self.reasoning = parser, reasoning
        self.sent_reasoning = self.sent_content = 0

    def delta(self, text: str) -> dict:
        """``{"reasoning": ..., "content": ...}``: the new, settled pieces of the reply so far."""
        reasoning, answer = split_reasoning(text) if self.reasoning else (None, text)
        out = {}
        if reasoning is not None and len(reasoning) > self.sent_reasoning and "</think>" not in text:
            # Still thinking: the reasoning streams as it comes (bar a partial closing tag).
            settled = reasoning[: text_before(reasoning, "</think>")]
            out["reasoning"] = settled[self.sent_reasoning :]
            self.sent_reasoning = len(settled)
        elif reasoning is not None and len(reasoning) > self.sent_reasoning:
            out["reasoning"] = reasoning[self.sent_reasoning :]
            self.sent_reasoning = len(reasoning)
        if reasoning is None or "</think>" in text:
            settled = text_before(answer, self.parser.trigger) if self.parser else len(answer)
            if settled > self.sent_content:
                out["content"] = answer[self.sent_content : settled]
                self.sent_content = settled
        return {k: v for k, v in out.items() if v}

    def final(self, text: str) -> tuple[str | None, str, list[ToolCall]]:
        """``(reasoning, answer, calls)`` of the whole reply."""
        reasoning, answer = split_reasoning(text) if self.reasoning else (None, text)
        content, calls = self.parser.parse(answer) if self.parser else (answer, [])
        return reasoning, content, calls

    def rest(self, text: str) -> tuple[str, list[ToolCall]]:
        """At the end of a stream: the answer text not sent yet, and the calls."""
        _, content, calls = self.final(text)
        _, answer = split_reasoning(text) if self.reasoning else (None, text)
        unsent = answer[self.sent_content :]
        if calls:  # what remained was the calls' text (and maybe text between them)
            unsent = content[self.sent_content :] if content.startswith(answer[: self.sent_content]) else ""
        self.sent_content = len(answer)
        return unsent, calls

