"""Prometheus metrics, one CollectorRegistry per app (several apps may share a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import events as ev

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
VAD_COUNTERS = {  # VADService.stats key → (metric, help)
    "silent_chunks": ("voice_agent_vad_silent_chunks", "Chunks of digital silence scored without the network"),
    "failed_chunks": ("voice_agent_vad_failed_chunks", "Audio chunks refused by the VAD (NaN or infinite samples)"),
}
BUS_COUNTERS = {  # EventBus.stats key → (metric, help)
    "events_dropped": ("voice_agent_bus_events_dropped", "Events a slow subscriber did not get (bus backpressure)"),
    "deltas_merged": ("voice_agent_bus_deltas_merged", "response.delta events merged for a slow subscriber"),
    "subscribers_disconnected": ("voice_agent_bus_subscribers_disconnected",
                                 "Event subscribers disconnected because they could not keep up"),
}
SESSION_COUNTERS = {  # Runtime.session_totals key → (metric, help)
    "events_dropped": ("voice_agent_session_events_dropped",
                       "Events a session made after its session.ended, dropped (each logged)"),
}


class _StatsCollector:
    """Counters another object keeps in a `stats` dict (the bus, the VAD), read at scrape time;
    `part`: the runtime's attribute whose `stats` they are, or ".name" for a dict the runtime holds."""

    def __init__(self, runtime: Any, part: str, counters: dict[str, tuple[str, str]]) -> None:
        self.runtime = runtime
        self.part = part
        self.counters = counters

    def collect(self) -> Any:
        if self.part.startswith("."):
            stats = getattr(self.runtime, self.part[1:], None) or {}
        else:
            stats = getattr(getattr(self.runtime, self.part, None), "stats", None) or {}
        for key, (name, doc) in self.counters.items():
            family = CounterMetricFamily(name, doc)
            family.add_metric([], float(stats.get(key, 0)))
            yield family


class Metrics:
    def __init__(self, runtime: Any, active_sessions: Callable[[], int]) -> None:
        self.runtime = runtime
        self._active = active_sessions
        r = self.registry = CollectorRegistry()
        self.sessions_active = Gauge("voice_agent_sessions_active", "Sessions open on this server", registry=r)
        self.sessions_started = Counter("voice_agent_sessions_started", "Sessions started", registry=r)
        self.sessions_ended = Counter("voice_agent_sessions_ended", "Sessions ended", ["reason"], registry=r)
        self.turns = Counter("voice_agent_turns_committed", "Turns committed", ["mode"], registry=r)
        self.responses = Counter("voice_agent_responses", "Responses finished", ["outcome"], registry=r)
        self.tool_calls = Counter("voice_agent_tool_calls", "Tool calls announced by the model", registry=r)
        self.errors = Counter("voice_agent_errors", "Error events", ["code"], registry=r)
        self.audio_dropped = Counter("voice_agent_audio_frames_dropped",
                                     "Audio frames dropped because a session fell behind", registry=r)
        self.vad_batch = Gauge("voice_agent_vad_batch_size", "Streams per VAD tick", ["stat"], registry=r)
        self.queue_depth = Gauge("voice_agent_inference_queue_depth", "Inference requests in flight", registry=r)
        self.backend_up = Gauge("voice_agent_backend_up", "1 while the inference backend can answer (a worker "
                                "is live, the OpenAI server answers its probe), else 0 (/healthz: 503)", registry=r)
        self.kv = Gauge("voice_agent_kv_cache", "KV cache of the inference workers: budget and use",
                        ["stat"], registry=r)
        self.first_token = Histogram("voice_agent_first_token_seconds", "Turn commit to first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.response_total = Histogram("voice_agent_response_seconds", "Turn commit to response done",
                                        buckets=LATENCY_BUCKETS, registry=r)
        # A turn's way to first sound, each stage from the end of speech (events' timings).
        self.turn_stages = Histogram("voice_agent_turn_stage_seconds",
                                     "End of the user's speech to each stage of the answer",
                                     ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        # Ratings of answers (the `feedback` command); failed recordings are voice_agent_errors{code="recording_failed"}.
        self.feedback = Counter("voice_agent_feedback", "Answers rated by people", ["rating"], registry=r)
        r.register(VoiceCollector(runtime))  # TTS failures are voice_agent_errors{code="tts_…"}
        r.register(_StatsCollector(runtime, "bus", BUS_COUNTERS))  # type: ignore[arg-type]
        r.register(_StatsCollector(runtime, "vad", VAD_COUNTERS))  # type: ignore[arg-type]
        r.register(_StatsCollector(runtime, ".session_totals", SESSION_COUNTERS))  # type: ignore[arg-type]

    def on_event(self, event: ev.Event) -> None:
        """Bus listener: synchronous and cheap."""
        if isinstance(event, ev.SessionStarted):
            self.sessions_started.inc()
        elif isinstance(event, ev.SessionEnded):
            self.sessions_ended.labels(event.reason).inc()
        elif isinstance(event, ev.TurnCommitted):
            self.turns.labels(event.mode).inc()
        elif isinstance(event, ev.ResponseDone):
            self.responses.labels("done").inc()
            if "first_token" in event.timings:
                self.first_token.observe(event.timings["first_token"])
            if "total" in event.timings:
                self.response_total.observe(event.timings["total"])
            self._stages(event.timings, ("end_detected", "commit", "first_token"))
        elif isinstance(event, ev.ResponseAudioStarted):
            self._stages(event.timings, ("first_clause", "first_audio", "first_frame"))
        elif isinstance(event, ev.ResponseCancelled) and event.reason != "backend_error":  # its error counted it
            self.responses.labels("cancelled").inc()
        elif isinstance(event, ev.ToolCall):
            self.tool_calls.inc()
        elif isinstance(event, ev.FeedbackReceived):
            self.feedback.labels(event.rating).inc()
        elif isinstance(event, ev.Error):
            self.errors.labels(event.code).inc()
            if event.turn_id is not None:
                self.responses.labels("error").inc()

    def _stages(self, timings: dict[str, float], stages: tuple[str, ...]) -> None:
        for stage in stages:
            if (value := timings.get(f"speech_end_to_{stage}")) is not None:
                self.turn_stages.labels(stage).observe(value)

    def render(self) -> tuple[bytes, str]:
        """Gauges that mirror other objects are read at scrape time."""
        self.sessions_active.set(self._active())
        stats = getattr(getattr(self.runtime, "vad", None), "stats", None) or {}
        for key, stat in (("mean_batch_size", "mean"), ("last_batch_size", "last")):
            if key in stats:
                self.vad_batch.labels(stat).set(float(stats[key]))
        self.backend_up.set(1 if getattr(getattr(self.runtime, "backend", None), "healthy", True) else 0)
        depth = getattr(getattr(self.runtime, "backend", None), "queue_depth", None)
        if isinstance(depth, (int, float)):
            self.queue_depth.set(depth)
        for stat, attr in (("budget_tokens", "kv_budget_tokens"), ("budget_bytes", "kv_budget_bytes"),
                           ("used_tokens", "kv_used_tokens")):
            value = getattr(getattr(self.runtime, "backend", None), attr, None)
            if isinstance(value, (int, float)):
                self.kv.labels(stat).set(value)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class VoiceCollector(Collector):
    """Speech-out totals, read at scrape time from the runtime's `VoiceCounters`."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        c = getattr(self.runtime, "voice_counters", None)
        if c is None:
            return
        answers = CounterMetricFamily("voice_agent_speech_answers", "Spoken answers whose playback ended",
                                      labels=["outcome"])
        answers.add_metric(["played"], c.answers - c.interrupted)
        answers.add_metric(["interrupted"], c.interrupted)
        yield answers
        for name, doc, value in (
                ("voice_agent_speech_played_seconds", "Agent audio sent out", c.played_s),
                ("voice_agent_speech_flushed_seconds", "Agent audio dropped unplayed when an answer was cut",
                 c.flushed_s),
                ("voice_agent_speech_underruns", "Frames in which speech synthesis was behind playback",
                 c.underruns),
                ("voice_agent_speech_echo_gated", "Speech over the agent's voice taken for its own echo",
                 c.echo_gated),
                ("voice_agent_speech_backchannels", "Speech over the agent's voice judged a backchannel",
                 c.backchannels)):
            yield CounterMetricFamily(name, doc, value=value)
