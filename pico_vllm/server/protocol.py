"""What the HTTP API accepts (pydantic request bodies) and its one error type.

Unknown fields are ignored, as OpenAI's server does; a wrong type or a missing field becomes a
400 in OpenAI's error shape (see ``app.py``), never FastAPI's 422.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pico_vllm.sampling_params import SamplingParams
from pico_vllm.structured_outputs import StructuredOutputsParams, as_structured_outputs

MAX_N = 16  # choices per request


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.headers = param, headers


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that validates."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# vLLM's older names for its structured_outputs fields.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


# Fields accepted that change nothing here (identification, storage, billing tiers); any other
# field this server does not implement is a 400 "not supported", never silently ignored.
NO_OP_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")


class SamplingFields(BaseModel):
    """What both endpoints take to build ``SamplingParams``."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    max_tokens: int | None = None
    # The defaults are SamplingParams' own: one place says what an omitted field means.
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    top_k: int = SamplingParams.top_k
    min_p: float = SamplingParams.min_p
    presence_penalty: float = SamplingParams.presence_penalty
    frequency_penalty: float = SamplingParams.frequency_penalty
    repetition_penalty: float = SamplingParams.repetition_penalty
    seed: int | None = SamplingParams.seed
    stop: str | list[str] | None = SamplingParams.stop
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = SamplingParams.ignore_eos
    min_tokens: int = SamplingParams.min_tokens
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, or the guided_* names.
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs_params(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's output constraint and the field that gave it (for error messages)."""
        given = {name: getattr(self, name) for name in ("structured_outputs", *GUIDED_FIELDS)
                 if getattr(self, name) is not None}
        if self.response_format is not None and self.response_format.type != "text":
            given["response_format"] = self.response_format
        if len(given) > 1:
            raise APIError(400, f"give one output constraint, got {', '.join(given)}",
                           param=next(iter(given)))
        if not given:
            return None, None
        (field, value), = given.items()
        try:
            if field == "response_format":
                if value.type == "json_object":
                    return StructuredOutputsParams(json_object=True), field
                if value.json_schema is None or value.json_schema.schema_ is None:
                    raise ValueError("json_schema.schema is required for type json_schema")
                return StructuredOutputsParams(json=value.json_schema.schema_), field
            if field == "structured_outputs":
                return as_structured_outputs(value), field
            return StructuredOutputsParams(**{GUIDED_FIELDS[field]: value}), field
        except ValueError as e:
            raise APIError(400, f"{field}: {e}", param=field) from None

    def top_n_logprobs(self) -> int | None:
        """How many top logprobs per token the request wants (None: no logprobs)."""
        return None

    def request_field(self, sampling_field: str) -> str:
        """The name this request gives a ``SamplingParams`` field (for error messages)."""
        return sampling_field

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            structured_outputs=self.structured_outputs_params()[0],
            logprobs=self.top_n_logprobs(),
            max_tokens=max_tokens if max_tokens is not None else SamplingParams.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            prediction=self.predicted_text(),
        )

    def predicted_text(self) -> str | None:
        """The output the client predicts (chat's ``prediction``), if any."""
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or a batch (its choices are numbered prompt by prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]  # an empty list is one empty prompt, which the engine rejects
        return list(prompt)

    def top_n_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """An assistant message's earlier call, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, message: object) -> object:
        """An image, audio or file part gets a message that says so, not a type mismatch."""
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            for part in message["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in (None, "text"):
                    raise ValueError(f"content parts of type {kind!r} are not supported by this "
                                     "model (text only)")
        return message

    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: the text the reply is expected to be (mostly)."""

    type: Literal["content"]
    content: str | list[TextPart]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    prediction: Prediction | None = None

    def predicted_text(self) -> str | None:
        if self.prediction is None:
            return None
        content = self.prediction.content
        return content if isinstance(content, str) else "".join(part.text for part in content)

    def tool_choice_name(self) -> str:
        """``none``, ``auto``, ``required`` or the forced tool's name (OpenAI's defaults: ``auto``
        with tools, ``none`` without); a choice that needs tools, without them, is a 400."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        name = choice if isinstance(choice, str) else choice.function.name
        if name != "none" and not self.tools:
            raise APIError(400, f"tool_choice {name!r} needs tools", param="tool_choice")
        return name

    def request_field(self, sampling_field: str) -> str:
        if sampling_field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return {"logprobs": "top_logprobs"}.get(sampling_field, sampling_field)

    def top_n_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
