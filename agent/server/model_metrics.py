"""`serve-model`'s Prometheus metrics. Where the agent server (`agent.server.metrics`) has
the same quantity, the name is the same: `voice_agent_inference_queue_depth`,
`voice_agent_kv_cache{stat}`, `voice_agent_first_token_seconds`,
`voice_agent_response_seconds`, `voice_agent_errors{code}`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.inference.base import GenerationStats
from agent.server.metrics import LATENCY_BUCKETS


class ModelMetrics:
    def __init__(self, server: Any) -> None:
        self.server = server
        r = self.registry = CollectorRegistry()
        self.requests = Counter("voice_agent_model_requests", "Chat-completions requests by outcome",
                                ["outcome"], registry=r)
        self.errors = Counter("voice_agent_errors", "Failed requests by error code", ["code"], registry=r)
        self.first_token = Histogram("voice_agent_first_token_seconds", "Request to first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.response_total = Histogram("voice_agent_response_seconds", "Request to last token",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.phases = Histogram("voice_agent_model_request_phase_seconds",
                                "Engine timings of finished requests (queue, encoder, prefill, speculative_prefill, ttft, total)",
                                ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("voice_agent_model_tokens", "Tokens: prompt, of it reused from cached KV, generated",
                              ["kind"], registry=r)
        r.register(_PoolCollector(server))  # type: ignore[arg-type]

    def observe(self, outcome: str, stats: GenerationStats, started: float, first: float | None) -> None:
        self.requests.labels(outcome).inc()
        now = time.perf_counter()
        if first is not None:
            self.first_token.observe(first - started)
        if outcome == "done":
            self.response_total.observe(now - started)
        for phase in ("queue", "encoder", "prefill", "speculative_prefill", "ttft", "total"):
            if phase in stats.timings:
                self.phases.labels(phase).observe(stats.timings[phase])
        self.tokens.labels("prompt").inc(stats.prompt_tokens)
        self.tokens.labels("reused").inc(stats.reused_tokens)
        self.tokens.labels("generated").inc(stats.tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PoolCollector(Collector):
    """Gauges read from the pool and the conversation keys at scrape time."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        pool, keys = self.server.pool, self.server.keys
        yield GaugeMetricFamily("voice_agent_inference_queue_depth", "Inference requests in flight",
                                value=pool.queue_depth)
        kv = GaugeMetricFamily("voice_agent_kv_cache", "KV cache of the inference workers: budget and use",
                               labels=["stat"])
        for stat, attr in (("budget_tokens", "kv_budget_tokens"), ("budget_bytes", "kv_budget_bytes"),
                           ("used_tokens", "kv_used_tokens")):
            value = getattr(pool, attr, None)
            if isinstance(value, (int, float)):
                kv.add_metric([stat], value)
        yield kv
        batch = getattr(pool, "batch_size", None)
        if isinstance(batch, (int, float)):
            yield GaugeMetricFamily("voice_agent_model_batch_size", "Requests decoding together (all workers)",
                                    value=batch)
        yield GaugeMetricFamily("voice_agent_model_workers_live", "Inference workers loaded and running",
                                value=getattr(pool, "workers_live", 0))
        yield CounterMetricFamily("voice_agent_model_worker_restarts", "Inference workers restarted",
                                  value=getattr(pool, "restarts", 0))
        yield CounterMetricFamily("voice_agent_model_prefills_skipped",
                                  "Speculative prefills not started (queue full or no live worker)",
                                  value=getattr(pool, "speculative_skipped", 0))
        yield GaugeMetricFamily("voice_agent_model_conversations", "Conversation keys whose KV the pool may hold",
                                value=len(keys))
        expired = CounterMetricFamily("voice_agent_model_conversations_forgotten",
                                      "Conversation keys forgotten: idle TTL, LRU bound, DELETE", labels=["reason"])
        for reason, count in keys.expired.items():
            expired.add_metric([reason], count)
        yield expired
