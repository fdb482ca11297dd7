"""Tool calls: how each model family writes a call in text, reading calls back, and the grammar
that makes a call complete and valid.

A model calls a tool by writing it in its family's format, after (or instead of) its answer. A
parser per format (vLLM's names: ``hermes``, ``llama3_json``, ``mistral``, ``qwen3_coder``,
``openai`` for gpt-oss's Harmony) does three things:

- ``parse(text)``: the answer's text outside the calls, and the calls (name + JSON arguments);
- ``grammar(tools, ...)``: a grammar (llguidance's Lark) over the output. With ``tool_choice`` ``required``
  or a named tool the output *is* one call or more, each call's arguments held to its tool's
  parameter schema; with ``auto`` the text is free until the call's opening marker appears,
  and from there the call is held the same way (llguidance's lazy lexemes: a call that starts
  always completes valid);
- ``render(name, arguments)``: a call in the family's text, for templates that cannot take
  ``tool_calls`` in a message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from pico_vllm.structured_outputs import JSON_LAYOUT


@dataclass
class ToolCall:
    """One call, as OpenAI's ``tool_calls`` entries carry it (``arguments`` is JSON text)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class Tool:
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class ToolCallParser:
    """One family's call format; see the module docstring. ``trigger`` opens a call."""

    name = ""
    trigger = ""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def render(self, name: str, arguments: dict) -> str:
        raise NotImplementedError

    def call_lark(self, tools: list[Tool], special: set[str]) -> tuple[str, str]:
        """Lark rules defining ``call_rest`` (what follows the trigger to the end of one call of
        any of ``tools``) and the separator between calls; ``special`` lists the markers that are
        single special tokens in this vocabulary."""
        raise NotImplementedError

    def grammar(self, tools: list[Tool], forced: bool, parallel: bool, special: set[str]) -> str | None:
        """The output's grammar: calls only (``forced``: ``required`` or a named tool), or free
        text in which every call, once its trigger appears, is held to its tool's schema (the
        shape of llguidance's own ``StructTag``: a lazy lexeme that ends at the trigger)."""
        rules, separator = self.call_lark(tools, special)
        trigger = _literal(self.trigger, special)
        if forced:
            many = f"({separator} {trigger} call_rest)*" if parallel else ""
            return f"%llguidance {{}}\nstart: {trigger} call_rest {many}\n{rules}"
        if self.trigger in special:  # a special token cannot sit inside a lexeme
            tag = f"tag: TAG_TEXT {trigger} call_rest"
        else:
            tag = f"tag_trigger[lazy]: TAG_TEXT {trigger}\ntag: tag_trigger call_rest"
        return (f"%llguidance {{}}\nstart: tag* tag_end\ntag_end: TAG_TEXT\nTAG_TEXT: /(.|\\n)*/\n"
                f"{tag}\n{rules}")


def _json(schema: dict) -> str:
    """A schema inlined in Lark, laid out as structured outputs lay JSON out (one line)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


def _literal(marker: str, special: set[str]) -> str:
    """A marker in Lark: a special token by name, or its text."""
    return marker if marker in special else json.dumps(marker)


def _call_schema(tools: list[Tool], arguments_key: str) -> dict:
    """A JSON object naming one of ``tools`` and carrying arguments valid for it."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
                "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _arguments_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class HermesParser(ToolCallParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``: Hermes, Qwen2.5, Qwen3,
    and the default tool prompt for templates without tool support."""

    name = "hermes"
    trigger = "<tool_call>"
    CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls = []
        for match in self.CALL.finditer(text):
            try:
                body = json.loads(match.group(1))
                calls.append(ToolCall(body["name"], _arguments_text(body.get("arguments", {}))))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []  # not a call after all: the text stays the answer
        content = self.CALL.sub("", text).strip() if calls else text
        return content, calls

    def render(self, name: str, arguments: dict) -> str:
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"

    def call_lark(self, tools: list[Tool], special: set[str]) -> tuple[str, str]:
        schema = _json(_call_schema(tools, "arguments"))
        return f'call_rest: "\\n" {schema} "\\n" {_literal("</tool_call>", special)}\n', '"\\n"'


class Llama3JsonParser(ToolCallParser):
    """Llama 3.1-3.3: ``{"name": ..., "parameters": {...}}`` as the whole message (optionally after
    ``<|python_tag|>``), several separated by ``;``."""

    name = "llama3_json"
    trigger = "{"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in body.split(";"):
            try:
                call = json.loads(part)
                arguments = call.get("parameters", call.get("arguments", {}))
                calls.append(ToolCall(call["name"], _arguments_text(arguments)))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []
        return "", calls

    def render(self, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, "parameters": arguments})

    def grammar(self, tools: list[Tool], forced: bool, parallel: bool, special: set[str]) -> str:
        """The call is the whole message (its "{" opens it): calls only, or else text that does
        not start with "{"."""
        schema = _json(_call_schema(tools, "parameters"))
        calls = 'call ("; " call)*' if parallel else "call"
        start = calls if forced else f"TEXT | {calls}"
        return f"%llguidance {{}}\nstart: {start}\nTEXT: /([^{{\\s](.|\\n)*)?/\ncall: {schema}\n"


class MistralParser(ToolCallParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (and the newer
    ``[TOOL_CALLS]name[ARGS]{...}``, read back too)."""

    name = "mistral"
    trigger = "[TOOL_CALLS]"
    NEW_STYLE = re.compile(r"\[TOOL_CALLS\](\w[\w.-]*)\[ARGS\](\{.*?\})(?=\[TOOL_CALLS\]|$)", re.S)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        head, marker, rest = text.partition("[TOOL_CALLS]")
        if not marker:
            return text, []
        try:
            if rest.lstrip().startswith("["):
                calls = [ToolCall(c["name"], _arguments_text(c.get("arguments", {})))
                         for c in json.loads(rest)]
            else:
                calls = [ToolCall(m.group(1), m.group(2)) for m in self.NEW_STYLE.finditer(marker + rest)]
                json.loads(calls[0].arguments) if calls else None
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            return text, []
        return (head.strip(), calls) if calls else (text, [])

    def render(self, name: str, arguments: dict) -> str:
        return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": arguments}])

    def call_lark(self, tools: list[Tool], special: set[str]) -> tuple[str, str]:
        schema = _json({"type": "array", "items": _call_schema(tools, "arguments"), "minItems": 1})
        return f"call_rest: {schema}\n", '""'

    def grammar(self, tools: list[Tool], forced: bool, parallel: bool, special: set[str]) -> str:
        return super().grammar(tools, forced, False, special)  # one marker, a list of calls


class Qwen3CoderParser(ToolCallParser):
    """Qwen3-Coder's XML: ``<tool_call>\\n<function=name>\\n<parameter=key>\\nvalue\\n</parameter>
    ...</function>\\n</tool_call>``; a value is JSON where it parses, else text."""

    name = "qwen3_coder"
    trigger = "<tool_call>"
    CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.S)
    PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls = []
        for match in self.CALL.finditer(text):
            arguments = {}
            for key, value in self.PARAMETER.findall(match.group(2)):
                try:
                    arguments[key] = json.loads(value)
                except json.JSONDecodeError:
                    arguments[key] = value
            calls.append(ToolCall(match.group(1).strip(), json.dumps(arguments)))
        return (self.CALL.sub("", text).strip(), calls) if calls else (text, [])

    def render(self, name: str, arguments: dict) -> str:
        parameters = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                             for k, v in arguments.items())
        return f"<tool_call>\n<function={name}>\n{parameters}</function>\n</tool_call>"

    def call_lark(self, tools: list[Tool], special: set[str]) -> tuple[str, str]:
        """A string parameter is raw text up to ``</parameter>`` (multi-line code included); any
        other is JSON held to its schema. Required parameters must appear, in schema order."""
        functions, values = [], []
        for i, tool in enumerate(tools):
            required = set(tool.parameters.get("required", []))
            params = []
            for j, (key, schema) in enumerate(tool.parameters.get("properties", {}).items()):
                if schema.get("type") == "string":
                    values.append(f'v{i}_{j}[suffix="\\n</parameter>\\n"]: /(.|\\n)*/')
                    body = f'"<parameter={key}>\\n" v{i}_{j}'
                else:
                    body = f'"<parameter={key}>\\n" {_json(schema)} "\\n</parameter>\\n"'
                params.append(f"({body})" + ("" if key in required else "?"))
            functions.append(f'f{i}: "<function={tool.name}>\\n" {" ".join(params)} "</function>"')
        names = " | ".join(f"f{i}" for i in range(len(tools)))
        close = _literal("</tool_call>", special)
        rules = [f'call_rest: "\\n" ({names}) "\\n" {close}', *functions, *values]
        return "\n".join(rules) + "\n", '"\\n"'


class HarmonyParser(ToolCallParser):
    """gpt-oss's Harmony: a call is ``<|channel|>commentary to=functions.NAME <|constrain|>json
    <|message|>{...}<|call|>``; the ``analysis`` channel is its reasoning, ``final`` the answer."""

    name = "openai"
    trigger = "<|channel|>commentary to=functions."
    CALL = re.compile(r"(?:<\|start\|>assistant)?<\|channel\|>commentary to=functions\.([\w.-]+)\s*"
                      r"(?:<\|constrain\|>\s*json)?\s*<\|message\|>(.*?)<\|call\|>", re.S)
    FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|end\|>|<\|return\|>|$)", re.S)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The ``final`` channel is the answer; the ``analysis`` channel (reasoning) is not."""
        calls = [ToolCall(m.group(1), m.group(2).strip()) for m in self.CALL.finditer(text)]
        try:
            [json.loads(c.arguments) for c in calls]
        except json.JSONDecodeError:
            return text, []  # not a call after all: the text stays the answer
        finals = self.FINAL.findall(text)
        if finals or "<|channel|>" in text:
            return "\n".join(f.strip() for f in finals), calls
        return text, calls  # no Harmony structure at all: plain text

    def render(self, name: str, arguments: dict) -> str:
        return (f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
                f"{json.dumps(arguments)}<|call|>")

    def grammar(self, tools: list[Tool], forced: bool, parallel: bool, special: set[str]) -> str | None:
        """Forced: one call on the commentary channel. ``auto`` is not held: every Harmony message
        opens with the same ``<|channel|>`` marker, answers and reasoning too."""
        if not forced:
            return None
        options = []
        for i, tool in enumerate(tools):
            options.append(f'h{i}: "{tool.name} " {_literal("<|constrain|>", special)} "json" '
                           f'{_literal("<|message|>", special)} {_json(tool.parameters)} '
                           f'{_literal("<|call|>", special)}')
        names = " | ".join(f"h{i}" for i in range(len(tools)))
        head = f"{_literal('<|channel|>', special)} \"commentary to=functions.\""
        return f"%llguidance {{}}\nstart: {head} ({names})\n" + "\n".join(options)


PARSERS: dict[str, type[ToolCallParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, Qwen3CoderParser, HarmonyParser)
}


def parser_for(model_type: str, chat_template: str | None, name: str | None = None) -> ToolCallParser:
    """The parser ``name`` asks for, else the one the model's chat template writes calls in (Hermes
    for a template without tool support: the default tool prompt asks for its format)."""
    if name is not None:
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose from {', '.join(PARSERS)}")
        return PARSERS[name]()
    template = chat_template or ""
    if model_type == "gpt_oss" or "<|channel|>" in template:
        return HarmonyParser()
    if "<function=" in template and "<parameter=" in template:
        return Qwen3CoderParser()
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<tool_call>" in template:
        return HermesParser()
    if "<|python_tag|>" in template or ("llama" in model_type and "tools" in template):
        return Llama3JsonParser()
    return HermesParser()


def template_takes_tools(chat_template: str | None) -> bool:
    """Whether the chat template renders a ``tools`` list (else the default tool prompt does)."""
    return bool(chat_template) and "tools" in chat_template


def default_tool_prompt(tools: list[Tool], parser: ToolCallParser) -> str:
    """The system prompt that teaches a model whose template has no tool support to call tools,
    in the parser's format (Hermes's own wording)."""
    signatures = "\n".join(json.dumps(t.as_openai()) for t in tools)
    example = parser.render("<function-name>", {"<arg>": "<value>"})
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{signatures}\n</tools>\n\nFor each function call, reply with:\n{example}")


def text_before(text: str, marker: str) -> int:
    """How much of a streamed ``text`` surely comes before ``marker``: up to it, and short of a
    tail that could be its beginning."""
    start = text.find(marker)
    if start >= 0:
        return start
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
