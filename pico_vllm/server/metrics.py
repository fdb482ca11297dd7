"""Prometheus metrics for ``/metrics``, in a registry of the app's own (two apps in one process,
as in the tests, do not share counters).

Counters and histograms are fed by the request handlers through a :class:`RequestRecord`, which
sees every output of every choice as it reaches the asyncio side; the gauges read the engine
thread's objects when scraped (plain ints: no lock needed).
"""

from __future__ import annotations

import time

import mlx.core as mx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pico_vllm.outputs import RequestOutput
from pico_vllm.server.async_engine import AsyncEngine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    """The server's counters, histograms and engine gauges, labelled by served model name."""

    def __init__(self, engines: list[AsyncEngine]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pico_vllm_requests", "finished requests", ["model", "finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("pico_vllm_prompt_tokens", "prompt tokens", ["model"],
                                     registry=self.registry)
        self.generated_tokens = Counter("pico_vllm_generation_tokens", "generated tokens", ["model"],
                                        registry=self.registry)
        self.rejected = Counter("pico_vllm_rejected_requests", "requests answered 429", ["reason"],
                                registry=self.registry)
        self.ttft = Histogram("pico_vllm_time_to_first_token_seconds", "arrival to first token",
                              ["model"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.inter_token = Histogram("pico_vllm_inter_token_latency_seconds",
                                     "time between a choice's consecutive tokens", ["model"],
                                     registry=self.registry, buckets=INTER_TOKEN_BUCKETS)
        self.e2e = Histogram("pico_vllm_e2e_request_latency_seconds", "arrival to last token",
                             ["model"], registry=self.registry, buckets=LATENCY_BUCKETS)
        gauges = {
            "pico_vllm_requests_in_flight": ("requests queued or running", lambda e: e.num_requests),
            "pico_vllm_requests_running": ("sequences running",
                                           lambda e: e.engine.scheduler_stats().num_running),
            "pico_vllm_requests_waiting": ("sequences waiting",
                                           lambda e: e.engine.scheduler_stats().num_waiting),
            "pico_vllm_kv_blocks_total": ("KV blocks in the pool",
                                          lambda e: e.engine.scheduler_stats().num_blocks),
            "pico_vllm_kv_blocks_used": ("KV blocks held by sequences (cached ones no sequence holds "
                                         "count as free)",
                                         lambda e: e.engine.scheduler_stats().num_blocks_used),
            "pico_vllm_prefix_cache_hit_tokens": ("prompt tokens served by the prefix cache",
                                                  lambda e: e.engine.stats.cached_prompt_tokens),
            "pico_vllm_preemptions": ("sequences preempted", lambda e: e.engine.stats.preemptions),
            "pico_vllm_spec_decode_draft_tokens": ("speculative decoding: tokens drafted and verified",
                                                   lambda e: e.engine.stats.draft_tokens),
            "pico_vllm_spec_decode_accepted_tokens": ("speculative decoding: drafted tokens kept",
                                                      lambda e: e.engine.stats.accepted_draft_tokens),
            "pico_vllm_spec_decode_verified_runs": ("speculative decoding: sequence-steps with drafts",
                                                    lambda e: e.engine.stats.draft_runs),
        }
        for name, (doc, read) in gauges.items():
            gauge = Gauge(name, doc, ["model"], registry=self.registry)
            for engine in engines:
                gauge.labels(engine.name).set_function(lambda e=engine, read=read: read(e))
        # The process's MLX memory, all models together: what a soak watches for growth.
        for name, doc, read in (
            ("pico_vllm_mlx_active_memory_bytes", "MLX memory in arrays now", mx.get_active_memory),
            ("pico_vllm_mlx_cache_memory_bytes", "MLX memory freed and kept for reuse", mx.get_cache_memory),
        ):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def request(self, model: str, started: float) -> RequestRecord:
        """A record for one request that arrived at ``started`` (``time.monotonic()``)."""
        return RequestRecord(self, model, started)


class RequestRecord:
    """One request's latencies and token counts, fed each output of each choice as it arrives."""

    def __init__(self, metrics: Metrics, model: str, started: float) -> None:
        self.metrics, self.model, self.started = metrics, model, started
        self.last_output_at: dict[str, float] = {}  # per choice (request id)
        self.ttft_recorded = False

    def first_tokens(self, prompt_tokens: int) -> None:
        """Every choice has its first token (its prompt is computed): the time to first token
        ends here, and the request's ``prompt_tokens`` (each prompt once, whatever ``n``) count."""
        if not self.ttft_recorded:
            self.ttft_recorded = True
            self.metrics.ttft.labels(self.model).observe(time.monotonic() - self.started)
            self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)

    def output(self, out: RequestOutput) -> None:
        """A choice's output reached the server: its new tokens, and its totals when it finished.
        Tokens that arrive together (one step may bring several, e.g. after a stop string held
        text back) share the gap since the previous output."""
        now = time.monotonic()
        previous = self.last_output_at.get(out.request_id)
        self.last_output_at[out.request_id] = now
        if previous is not None and out.delta_token_ids:
            gap = (now - previous) / len(out.delta_token_ids)
            for _ in out.delta_token_ids:
                self.metrics.inter_token.labels(self.model).observe(gap)
        if out.finished:
            self.metrics.e2e.labels(self.model).observe(now - self.started)
            self.metrics.requests.labels(self.model, out.finish_reason).inc()
            self.metrics.generated_tokens.labels(self.model).inc(len(out.token_ids))

