"""The engine: request intake, one ``step`` of scheduling + model + sampling, and outputs.

A request's path: ``add_request`` tokenizes and validates it and queues a ``Sequence``;
each ``step`` asks the scheduler which tokens to compute, lets the model runner compute them
and sample, then appends the new tokens, detokenizes, checks stop conditions and frees the
blocks of finished sequences. ``LLM.generate``, the CLI and the benchmark all drive this loop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import mlx.core as mx

from pico_vllm import distributed
from pico_vllm.config import EngineConfig
from pico_vllm.engine.detokenizer import IncrementalDetokenizer
from pico_vllm.engine.draft_model import DraftModelProposer
from pico_vllm.engine.memory import resolve_num_blocks, wire_memory
from pico_vllm.engine.model_runner import ModelRunner
from pico_vllm.engine.pending_step import PendingStep
from pico_vllm.engine.scheduler import Scheduler, SchedulerOutput
from pico_vllm.engine.sequence import Sequence
from pico_vllm.engine.speculative import after_verification
from pico_vllm.layers.sampler import Sampler
from pico_vllm.loader import LoadedModel, load
from pico_vllm.models import sliding_window, text_config
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.structured_outputs import GrammarCompiler

Prompt = str | list[int] | dict
"""Text, token ids, or vLLM's ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``."""


class StepError(RuntimeError):
    """A step failed: ``request_ids`` are the requests it carried, aborted; ``cause`` is why."""

    def __init__(self, request_ids: list[str], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids, self.cause = request_ids, cause


@dataclass
class EngineStats:
    """Running totals, for throughput reports and tests."""

    steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens drafted and verified
    accepted_draft_tokens: int = 0  # of those, kept
    draft_runs: int = 0  # sequence-steps that verified drafts
    cascade_steps: int = 0  # steps whose decode rows shared blocks through cascade attention

    @property
    def draft_acceptance_rate(self) -> float | None:
        """Drafts kept / drafts verified (None before any draft)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Drafts kept per sequence-step that verified drafts (None before any)."""
        return self.accepted_draft_tokens / self.draft_runs if self.draft_runs else None


@dataclass(frozen=True)
class SchedulerStats:
    """What the engine holds right now (vLLM's ``SchedulerStats``), for metrics."""

    num_running: int  # sequences being computed
    num_waiting: int  # sequences queued (new or preempted)
    num_blocks: int  # KV blocks in the pool
    num_blocks_used: int  # held by sequences (cached blocks no sequence holds count as free)


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    emitted_tokens: int = 0
    stop_reason: str | int | None = None  # the stop string or token id that ended it


class LLMEngine:
    """Continuous-batching engine over a paged KV pool (see the module docstring)."""

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        """Load ``config.model`` (or use an already ``loaded`` one) and size the KV pool."""
        config = config or EngineConfig()
        # A pipeline stage reads only its own layers' weights (evaluated once its pool is sized).
        loaded = loaded or load(config.model, config.dtype, config.model_impl,
                                lazy=config.pipeline_parallel_size > 1)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.vocab_size = self.model.vocab_size
        if (config.max_model_len or 0) > loaded.max_model_len:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit of "
                             f"{loaded.max_model_len} tokens (max_position_embeddings)")
        max_model_len = config.max_model_len or loaded.max_model_len
        window = sliding_window(text_config(loaded.config))
        if window is not None and window not in self.model.layer_windows and max_model_len > window:
            # Up to the window, full attention is the windowed attention exactly; past it, not.
            raise ValueError(
                f"this checkpoint attends over a sliding window of {window} tokens, which its model "
                f"code here ({type(self.model).__module__}) does not apply; with max_model_len <= "
                f"{window} (--max-model-len {window}) it is served exactly"
            )
        self.group = None  # the ranks the model is split over (tensor or pipeline parallel)
        self.stage = None  # this rank's layers, under pipeline parallelism
        self._check_samples = False  # compare every step's samples across ranks (debug mode)
        if config.tensor_parallel_size > 1:
            self.group = distributed.launched_group(config.tensor_parallel_size)
            self._check_samples = distributed.check_samples_enabled()
            self.model.shard(self.group)
        if config.pipeline_parallel_size > 1:
            _check_pipeline(config)
            self.group = distributed.launched_group(config.pipeline_parallel_size, "pipeline_parallel_size")
            self._check_samples = distributed.check_samples_enabled()
            self.stage = self.model.pipeline(self.group)
        # Resolved once, here: everything after reads these sizes from self.config. A hybrid's
        # prefix hits resume from state snapshots (none: every prompt is computed in full).
        hybrid = self.model.state_spec is not None
        if hybrid:
            _check_hybrid(config)
        snapshots = 0
        if hybrid and config.enable_prefix_caching:
            snapshots = config.num_state_snapshots
            snapshots = config.max_num_seqs if snapshots is None else snapshots
        config = replace(config, num_state_snapshots=snapshots, max_model_len=max_model_len,
                         enable_prefix_caching=config.enable_prefix_caching and (not hybrid or snapshots > 0))
        num_blocks = self._agreed_num_blocks(config, loaded.dtype)
        mx.eval(self.model.parameters())  # a pipeline stage's weights, read once its pool fits
        self.config = config = replace(config, num_blocks=num_blocks)
        sampler = Sampler(self.eos_token_ids, seed=config.seed)
        self.runner = ModelRunner(self.model, config, sampler, loaded.dtype)
        windows = self.runner.cache.layout.windows
        wire_memory()  # on a Mac: weights and pool stay resident
        speculative, proposer = self.config.speculative, None
        if speculative is not None and speculative.method == "draft_model":
            proposer = DraftModelProposer.load(speculative, self.config, loaded, len(windows))
        self.scheduler = Scheduler(self.config, windows, proposer)
        self._async = config.async_scheduling
        if config.capture_graphs == "startup" and self.runner.graphs is not None:
            from tqdm import tqdm

            self.runner.capture_all(lambda buckets: tqdm(buckets, desc="capturing decode graphs"))
        self.stats = EngineStats()
        eos = min(self.eos_token_ids) if self.eos_token_ids else 0
        self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, eos)
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._in_flight: tuple[PendingStep, list[int]] | None = None  # a step not yet read back

    def _agreed_num_blocks(self, config: EngineConfig, dtype: mx.Dtype) -> int:
        """This rank's pool size (``resolve_num_blocks``); split over ranks, the smallest any rank
        can hold, as every rank must run the same schedule. A rank whose slice leaves no room
        says so, and the others fail with it rather than wait for it in the collective."""
        try:
            num_blocks, failed = resolve_num_blocks(config, self.model, dtype), None
        except ValueError as error:
            if self.group is None:
                raise
            num_blocks, failed = 0, error
        if self.group is None:
            return num_blocks
        num_blocks = distributed.smallest(num_blocks, self.group)
        if num_blocks == 0:
            where = f"rank {self.group.rank()}"
            if self.stage is not None:
                where += f" (layers {self.stage.layers.start}-{self.stage.layers.stop - 1})"
            raise ValueError(f"{where}: {failed}" if failed else
                             f"{where} holds its slice, but another rank's leaves no room for a KV pool "
                             "(its error says why)")
        return num_blocks

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request (text or token ids); returns its id. Raises ``ValueError`` for a request
        that is malformed or can never fit, leaving the engine untouched."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt = _unwrap_prompt_dict(prompt)
        token_ids = self._tokenize(prompt)
        self._check_vocabulary("stop_token_ids", params.stop_token_ids)
        seq = Sequence(request_id, token_ids, params)
        if params.prediction is not None and self.model.state_spec is not None:
            raise ValueError("prediction: a hybrid model's linear layers cannot roll back rejected "
                             "drafts yet, so Predicted Outputs are not served for this model")
        if params.prediction is not None:
            seq.prediction = self._prediction_tokens(params.prediction)
        if params.structured_outputs is not None:  # an invalid schema or regex is a ValueError
            seq.grammar = self._grammars.matcher(params.structured_outputs)
        self.scheduler.add_sequence(seq)  # rejects what can never fit, before anything is kept
        text = prompt if isinstance(prompt, str) else None
        detokenizer = IncrementalDetokenizer(self.tokenizer, list(params.stop), token_ids)
        self._requests[request_id] = _Request(seq, text, detokenizer)
        self.stats.prompt_tokens += len(token_ids)
        return request_id

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile ``params``' output constraint now (cached for its requests): ValueError naming
        the constraint if the schema, regex or grammar is invalid. Safe from another thread."""
        if params.structured_outputs is not None:
            self._grammars.matcher(params.structured_outputs)

    def prompt_progress(self, request_id: str) -> tuple[int, int]:
        """``(prompt tokens computed, prompt tokens)`` of a live request (progress bars)."""
        seq = self._requests[request_id].seq
        return min(seq.num_computed_tokens, seq.num_prompt_tokens), seq.num_prompt_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks. Returns its final output (``finish_reason``
        "abort", the tokens already handed out), or None if it is unknown or already finished."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        return self._output(request, "abort", request.emitted_tokens)

    def scheduler_stats(self) -> SchedulerStats:
        """Sequences running and waiting and KV blocks in use, now."""
        manager = self.scheduler.block_manager
        return SchedulerStats(len(self.scheduler.running), self.scheduler.num_waiting, manager.num_blocks,
                              manager.num_blocks - manager.num_free_blocks)

    def memory_summary(self) -> str:
        """The pools' sizes, as start-up prints them: KV blocks and, for a hybrid model, the
        state slots and each sequence's state."""
        cache, config = self.runner.cache, self.config
        kv = sum(a.nbytes for a in cache.state) - (cache.states.nbytes if cache.states else 0)
        text = (f"KV pool: {config.num_blocks} blocks of {config.block_size} tokens "
                f"({kv / 2**20:.1f} MiB)")
        states = cache.states
        if states is not None:
            per_seq = states.spec.bytes_per_sequence
            text += (f"; state pool: {states.num_slots} sequences + {states.num_snapshots} prefix "
                     f"snapshots, {per_seq / 2**10:.1f} KiB each ({len(states.spec.layers)} linear layers; "
                     f"{states.nbytes / 2**20:.1f} MiB with the scratch slot)")
            text += (f"; prefix hits resume from state snapshots, {per_seq / 2**10:.1f} KiB per cached block "
                     "boundary" if states.num_snapshots else "; prefix caching off (no state snapshots)")
        return text

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block that no request holds (vLLM's ``reset_prefix_cache``):
        the next prompt computes its KV again, as on a fresh engine."""
        self.scheduler.block_manager.reset_prefix_cache()

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that got a token.

        An exception inside the step aborts the requests it carried (their blocks freed) and is
        raised as ``StepError`` naming them; the other requests and the engine go on.

        With ``async_scheduling`` the step queued here evaluates in the background while the
        host reads back the *previous* step and builds its outputs: the new step's decode inputs
        are the previous step's sampled ids, taken on the device. A sequence that turns out to
        have finished (EOS, a stop string) has its one extra token discarded. A batch whose
        sampling reads earlier token ids (penalties) reads the previous step back first, and so
        does a step after one that verified drafts or before one that drafts.
        """
        carried = {seq.request_id for seq in self._in_flight[0].seqs} if self._in_flight else set()
        try:
            outputs = []
            if self._in_flight is not None and (self._in_flight[0].drafts or self.scheduler.wants_drafts()):
                # How many drafts a verification kept decides where its sequence goes on, and
                # drafting reads a sequence's newest token: read the step in flight back first.
                outputs = self._complete(*self._in_flight)
                self._in_flight = None
            out = self.scheduler.schedule()
            carried |= {seq.request_id for seq, _ in out.scheduled}
            return outputs + self._step(out)
        except Exception as e:
            if not carried:  # the scheduler itself failed: no request's state can be trusted
                carried = set(self._requests)
            self._in_flight = None
            for request_id in carried:  # no output built: the detokenizer may be what failed
                if self._requests.pop(request_id, None) is not None:
                    self.scheduler.abort(request_id)
            raise StepError(sorted(carried), e) from e

    def _step(self, out: SchedulerOutput) -> list[RequestOutput]:
        self.stats.preemptions += len(out.preempted)
        outputs = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and (out.is_empty or self.runner.needs_token_values(out)):
            outputs += self._complete(*previous)
            previous = None
            # What finished just now (EOS, a stop) has nothing more to compute.
            out.scheduled = [(seq, n) for seq, n in out.scheduled if not seq.is_finished]
        if not out.is_empty:
            pending = self.runner.execute(out, previous[0] if previous else None)
            pending.start()
            self.scheduler.advance(out, pending.seqs)
            self.stats.steps += 1
            self.stats.cascade_steps += pending.cascade
            # Where each sampled token goes in its sequence, once the host reads it.
            self._in_flight = (pending, [len(seq.token_ids) - 1 for seq in pending.seqs])
        if previous is not None:
            outputs += self._complete(*previous)
        if self._in_flight is not None and not self._async:
            outputs += self._complete(*self._in_flight)
            self._in_flight = None
        return outputs

    def _complete(self, pending: PendingStep, indices: list[int]) -> list[RequestOutput]:
        """Read a step back: fill in its tokens, detokenize, check stops, finish requests."""
        samples = pending.resolve()
        if self._check_samples:
            tokens = [sample.token_id for seq in pending.seqs for sample in samples[seq]]
            distributed.check_same_tokens(tokens, self.group)
        outputs = []
        for seq, index in zip(pending.seqs, indices):
            if seq.is_finished:
                continue  # finished or aborted after this step was queued: its token is dropped
            request = self._requests[seq.request_id]
            if seq in pending.failed:
                del self._requests[seq.request_id]
                self.scheduler.finish(seq)
                position = index + 1 - seq.num_prompt_tokens
                error = f"the model's logits were not numbers (NaN or inf) at output token {position}"
                outputs.append(replace(self._output(request, "error", request.emitted_tokens), error=error))
                continue
            # Tokens one by one, as if generated by as many steps: a stop inside the run ends it.
            kept, reason = [], None
            for sample in samples[seq]:
                kept.append(sample.token_id)
                if seq.params.logprobs is not None:
                    request.logprobs.append(sample.logprob)
                    request.top_logprobs.append(sample.top_logprobs or [])
                num_output = index + len(kept) - seq.num_prompt_tokens
                reason = self._finish_reason(request, sample.token_id, num_output)
                if reason is not None:
                    break
            drafted, verified = len(pending.drafts.get(seq, ())), len(samples[seq]) - 1
            self.scheduler.tokens_known(seq, index, kept, num_rejected=drafted - verified)
            after_verification(seq, drafted, verified)
            self.stats.generated_tokens += len(kept)
            self.stats.draft_tokens += drafted
            self.stats.accepted_draft_tokens += verified
            self.stats.draft_runs += drafted > 0
            seq.num_draft_tokens += drafted
            seq.num_accepted_draft_tokens += verified
            if reason is not None:
                self.scheduler.finish(seq)
                self.stats.cached_prompt_tokens += seq.num_cached_tokens
                del self._requests[seq.request_id]
            outputs.append(self._output(request, reason, num_output))
        return outputs

    def _finish_reason(self, request: _Request, token: int, num_output: int) -> str | None:
        """Detokenize ``token``, the request's ``num_output``-th, and say why the request ends
        here, if it does. A structured output ends when its grammar is complete."""
        params = request.seq.params
        may_stop = num_output >= params.min_tokens
        grammar = request.seq.grammar
        if grammar is not None and not grammar.is_stopped() and token not in self.eos_token_ids:
            grammar.consume_token(token)
            if grammar.is_stopped():
                request.detokenizer.add_token(token)
                request.detokenizer.finalize()
                return "stop"
        if may_stop and (
            token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos)
        ):
            request.detokenizer.finalize()
            request.stop_reason = token if token in params.stop_token_ids else None
            return "stop"  # the stop token's text is not part of the output
        if request.detokenizer.add_token(token) and may_stop:
            request.stop_reason = request.detokenizer.matched_stop
            return "stop"
        num_tokens = request.seq.num_prompt_tokens + num_output
        if num_output >= params.max_tokens or num_tokens >= self.config.max_model_len:
            request.detokenizer.finalize()
            return "length"
        return None

    def _output(self, request: _Request, reason: str | None, num_output: int) -> RequestOutput:
        seq = request.seq
        prompt_len = seq.num_prompt_tokens
        tokens = seq.token_ids[prompt_len : prompt_len + num_output]
        delta_tokens = tokens[request.emitted_tokens :]
        request.emitted_tokens = len(tokens)
        wants_logprobs = seq.params.logprobs is not None
        return RequestOutput(
            request_id=seq.request_id,
            prompt=request.prompt,
            prompt_token_ids=seq.token_ids[:prompt_len],
            text=request.detokenizer.text,
            token_ids=tokens,
            finished=reason is not None,
            finish_reason=reason,
            delta_text=request.detokenizer.take_delta(finished=reason is not None),
            delta_token_ids=delta_tokens,
            logprobs=list(request.logprobs) if wants_logprobs else None,
            top_logprobs=list(request.top_logprobs) if wants_logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
            stop_reason=request.stop_reason,
            num_draft_tokens=seq.num_draft_tokens,
            num_accepted_draft_tokens=seq.num_accepted_draft_tokens,
        )

    def _prediction_tokens(self, prediction: str | list[int]) -> list[int]:
        if isinstance(prediction, str):
            return list(self.tokenizer.encode(prediction, add_special_tokens=False))
        self._check_vocabulary("prediction token ids", prediction)
        return list(prediction)

    def _check_vocabulary(self, what: str, token_ids: list[int]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what} {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError(
                f"prompt must be a str, a list of token ids or a prompt dict, got "
                f"{type(prompt).__name__} {prompt!r:.80}"
            )
        if not prompt:
            raise ValueError("prompt is empty")
        self._check_vocabulary("prompt token ids", prompt)
        return list(prompt)


def _check_pipeline(config: EngineConfig) -> None:
    """What pipeline parallelism does not serve yet: a clear error before the launch."""
    if config.speculative_config is not None:
        raise ValueError("speculative decoding is not served with pipeline parallelism yet: drop "
                         "speculative_config or --pipeline-parallel-size")


def _check_hybrid(config: EngineConfig) -> None:
    """What a hybrid model (linear layers with recurrent state) is not served with yet."""
    if config.speculative_config is not None:
        raise ValueError("speculative decoding needs rejected drafts rolled back, which a hybrid "
                         "model's linear-layer state cannot be yet: serve it without "
                         "speculative_config")


def _unwrap_prompt_dict(prompt: Prompt) -> str | list[int]:
    """vLLM's ``{"prompt": text}`` / ``{"prompt_token_ids": ids}`` -> the text or ids inside."""
    if not isinstance(prompt, dict):
        return prompt
    if set(prompt) == {"prompt"}:
        return prompt["prompt"]
    if set(prompt) == {"prompt_token_ids"}:
        return prompt["prompt_token_ids"]
    raise ValueError(
        "a prompt dict must have exactly one key, 'prompt' (text) or 'prompt_token_ids' (a list "
        f"of ints); got keys {sorted(prompt)}"
    )
