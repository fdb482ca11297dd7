"""What the engine hands back for a request (mirrors ``vllm.RequestOutput``, flattened to n=1)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The state of one request after a step.

    ``text``/``token_ids`` hold everything generated so far; ``delta_text``/``delta_token_ids``
    only what this step added (what a streaming client prints). ``logprobs[i]`` is the
    log-probability of ``token_ids[i]`` and ``top_logprobs[i]`` the top-n ``(id, logprob)``
    pairs at that step, when the request asked for ``logprobs``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error", once finished
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # What ended a "stop": the stop string or stop token id (None for EOS or a grammar's end).
    stop_reason: str | int | None = None
    # Speculative decoding (or a prediction): tokens drafted for this request and verified, and
    # of those, kept.
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    error: str | None = None  # why a request finished with "error" (its logits were not numbers)
