"""The offline Python API, mirroring ``vllm.LLM``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pico_vllm.config import EngineConfig
from pico_vllm.engine.llm_engine import LLMEngine, Prompt
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams

Prompts = Prompt | Sequence[Prompt]
Params = SamplingParams | Sequence[SamplingParams] | None


class LLM:
    """Generate text for many prompts at once on one continuous-batching engine.

    >>> llm = LLM()                          # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text, out[0].token_ids, out[0].finish_reason
    >>> llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0))[0].text

    Keyword arguments are :class:`EngineConfig` fields (``block_size``, ``num_blocks``, ...).
    """

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))

    @property
    def tokenizer(self):
        """The model's tokenizer (mlx-lm ``TokenizerWrapper``)."""
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (vLLM's ``LLM.reset_prefix_cache``): the next prompts
        compute their KV again, as on a fresh engine (a benchmark's cold start)."""
        self.engine.reset_prefix_cache()

    def generate(
        self, prompts: Prompts, sampling_params: Params = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Run every prompt to completion; returns their final outputs in prompt order.
        ``use_tqdm`` shows a progress bar over finished prompts (on stderr), as vLLM does."""
        from tqdm import tqdm

        final: dict[str, RequestOutput] = {}
        ids = self._add(prompts, sampling_params)
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            for out in self._run(ids):
                if out.finished:
                    final[out.request_id] = out
                    bar.update(1)
        return [final[i] for i in ids]

    def stream(self, prompts: Prompts, sampling_params: Params = None) -> Iterator[RequestOutput]:
        """Yield each step's per-request outputs (``delta_text`` is what is new) as they come."""
        yield from self._run(self._add(prompts, sampling_params))

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: Params = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (``[{"role": ..., "content": ...}, ...]``) or a list of them
        through the chat template; returns one output per conversation, as vLLM does."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the tokenizer's chat template."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(
                'messages must be a non-empty list of {"role": ..., "content": ...} dicts, got '
                f"{type(messages).__name__}"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise ValueError(f'message {i} must be a dict with "role" and "content", got {message!r:.80}')
            if not isinstance(message["role"], str) or not isinstance(message["content"], str):
                raise ValueError(f'message {i}: "role" and "content" must be strings')
        return chat_prompt_ids(self.tokenizer, messages)

    def _add(self, prompts: Prompts, sampling_params: Params) -> list[str]:
        prompts = _as_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(
                "sampling_params must be a SamplingParams or a list of them, got "
                f"{type(sampling_params).__name__} (e.g. SamplingParams(max_tokens=4))"
            )
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} sampling_params for {len(prompts)} prompts"
                )
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for request_id in ids:  # all or nothing: the engine stays clean for the next call
                self.engine.abort_request(request_id)
            raise
        return ids

    def _run(self, ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(ids)
        try:
            while pending and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:  # the caller stopped early: free what is left
                self.engine.abort_request(request_id)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through ``tokenizer``'s chat template, ready for the reply
    (``LLM.chat``, the server's chat endpoint); ValueError if it has no template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _as_list(prompts: Prompts) -> list[Prompt]:
    """One prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(
            "prompts must be a str, a list of token ids, a prompt dict or a list of those, got "
            f"{type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts
