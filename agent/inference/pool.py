"""`InferencePool`: the local `Backend`, worker processes each running an `Engine`.

One process per GPU (one on the CPU), started with `spawn` so CUDA and torch threads start
clean. Each worker has its own pair of mp queues: a worker killed mid-write can then only
break its own pipes, never another worker's. A reader thread per worker hands outputs to
the event loop (`call_soon_threadsafe`), which routes them to per-request asyncio queues.
A session sticks to one worker while it lives, since its KV cache is there. Audio the
worker's cache of the session already holds goes by reference (`AudioRef`): a turn then
carries only its own audio across the pipe, not the whole history's; when the worker has
dropped that history meanwhile it answers `audio_missing` and the request is sent again whole.

Faults. A worker that dies, live or still loading, is restarted: at once the first time,
then with exponential backoff while replacements keep dying before they load. Its requests
fail with `worker_died`. New requests go to a live worker, else wait on one that is loading
(they fail with `worker_died` if it dies too), else fail at once with `backend_unavailable`.
`healthy` is False while no worker is live. A worker that is alive but makes no progress (no
output, no heartbeat) for `step_timeout_s` while it has requests in flight is wedged: its
requests fail with `worker_stalled` and it is killed, then restarted like a dead one. A turn after a single kill waits for the
replacement's start: process spawn and imports, then the model load (seconds for
tiny-random, the weights' read time for a real model).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.inference.base import AudioRef, GenerationRequest, GenerationStats, InferenceError
from agent.inference.engine import Output
from agent.inference.prompts import audio_hash
from agent.inference.worker import worker_main
from agent.model.family import Family, all_families

log = logging.getLogger(__name__)

READER_POLL_S = 0.2  # how soon a dead worker is noticed
STOP_GRACE_S = 5.0
STABLE_S = 30.0  # a worker live this long has recovered: the backoff starts over


@dataclass
class _Worker:
    index: int
    device: str | None
    process: Any
    inbox: Any
    outbox: Any
    ready: asyncio.Future[tuple[Any, ...]]
    inflight: set[str] = field(default_factory=set)
    stopping: bool = False  # being closed on purpose
    live: bool = False  # loaded and not dead
    dead: bool = False  # exited; a replacement is scheduled
    failures: int = 0  # deaths in a row without staying live for STABLE_S
    live_since: float = 0.0
    restart_at: float = 0.0  # when dead: the replacement's scheduled start (monotonic)
    info: dict[str, Any] = field(default_factory=dict)  # the engine's: KV budget, device
    stats: dict[str, Any] = field(default_factory=dict)  # the latest step's: KV in use
    reader: threading.Thread | None = None
    progress_at: float = 0.0  # its last message, or when it got work while idle (monotonic)
    stalled: bool = False  # killed by the step watchdog


class InferencePool:
    name = "local"

    def __init__(self, model: str = "auto", workers: int | None = None, max_batch: int = 16,
                 max_queue: int = 64, device: str | None = None, kv_budget_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, prefill_chunk_tokens: int = 512,
                 encoder_padded: bool = False, start_timeout: float = 600.0,
                 restart_backoff_s: tuple[float, float] = (1.0, 30.0), step_timeout_s: float = 60.0) -> None:
        self.model = model
        self.model_name = model
        self.tokenizer: Any = None  # loaded in this process at start(), for exact prompt budgets
        self.family: Family | None = None  # the model's format, known at start() (prompt budgets)
        self.warning: str | None = None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.engine_options: dict[str, Any] = {
            "max_batch": max_batch, "kv_budget_tokens": kv_budget_tokens,
            "gpu_memory_utilization": gpu_memory_utilization, "prefill_chunk_tokens": prefill_chunk_tokens,
            "encoder_padded": encoder_padded}
        self.start_timeout = start_timeout
        self.restart_backoff_s = restart_backoff_s
        self.step_timeout_s = step_timeout_s
        self.stalls = 0  # workers killed by the step watchdog
        self._watchdog: asyncio.TimerHandle | None = None
        self._workers_wanted = workers
        self._device = device
        self._workers: list[_Worker] = []
        self._requests: dict[str, asyncio.Queue[Output | InferenceError]] = {}
        self._specs: dict[str, tuple[int, str, str]] = {}  # speculative rid → (worker, session, turn)
        self._sessions: dict[str, int] = {}  # session → worker index
        self._covered: dict[str, set[str]] = {}  # session → audio digests its worker's KV holds
        self._digests: dict[int, tuple[Any, int, bytes, str]] = {}  # id(array) → (weakref, size, probe, digest)
        self.audio_resends = 0  # requests sent again whole: the worker no longer had their history
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: Any = None
        self._started = False
        self._closing = False
        self._timers: dict[int, asyncio.TimerHandle] = {}  # worker index → scheduled restart
        self.restarts = 0
        self.speculative_skipped = 0  # prefills not started: queue full or no live worker

    # ---- state --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """At least one worker is loaded and running."""
        return self._started and not self._closing and any(w.live for w in self._workers)

    @property
    def health_reason(self) -> str | None:
        """Why no answer can be produced now (None: one can)."""
        if self.healthy:
            return None
        if not self._started or self._closing:
            return "the inference pool is not running"
        if any(not w.dead and not w.live for w in self._workers):
            return "no inference worker is running: a replacement is loading the model"
        waits = [w.restart_at - time.monotonic() for w in self._workers if w.dead]
        when = f"; next restart in {max(0.0, min(waits)):.1f} s" if waits else ""
        return f"no inference worker is running{when}"

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not finished (all workers)."""
        return len(self._requests)

    def _live_info(self, key: str, source: str = "info") -> int | None:
        values = [getattr(w, source).get(key) for w in self._workers if w.live]
        return sum(v for v in values if v is not None) if values else None

    @property
    def kv_budget_tokens(self) -> int | None:
        """KV budget of the live workers together, as each computed it from its device."""
        return self._live_info("kv_budget_tokens")

    @property
    def kv_budget_bytes(self) -> int | None:
        return self._live_info("kv_budget_bytes")

    @property
    def workers_live(self) -> int:
        return sum(1 for w in self._workers if w.live)

    @property
    def batch_size(self) -> int | None:
        """Requests decoding together at the live workers' last steps."""
        return self._live_info("running", "stats")

    @property
    def kv_used_tokens(self) -> int | None:
        """KV the live workers hold or have reserved for admitted requests (at their last step)."""
        return self._live_info("kv_tokens", "stats")

    # ---- lifecycle ----------------------------------------------------------------------

    def _devices(self) -> list[str | None]:
        if self._device is not None:
            return [self._device] * (self._workers_wanted or 1)
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            return [f"cuda:{i % gpus}" for i in range(self._workers_wanted or gpus)]
        return [None] * (self._workers_wanted or 1)  # None: models.load picks the CPU

    async def start(self) -> None:
        """Start the workers and wait until every one has loaded the model."""
        import multiprocessing

        self._loop = asyncio.get_running_loop()
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [self._spawn(i, dev) for i, dev in enumerate(self._devices())]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(w.ready for w in self._workers)),
                                             self.start_timeout)
        except InferenceError:
            await self.close()
            raise
        except TimeoutError:
            await self.close()
            raise InferenceError("model_load", f"model {self.model!r} did not load in {self.start_timeout:.0f} s") from None
        self._started = True
        self._watch()
        self.model_name, self.warning = results[0][0], results[0][1]
        from agent.inference.models import known_family, load_tokenizer

        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_name)
        told = results[0][3].get("family") if len(results[0]) > 3 else None  # what the worker loaded
        self.family = next((f for f in all_families() if f.name == told), None) or \
            await asyncio.to_thread(known_family, self.model_name)

    def _spawn(self, index: int, device: str | None) -> _Worker:
        assert self._loop is not None
        inbox, outbox = self._ctx.Queue(), self._ctx.Queue()
        # workers sharing a device each plan for their part of its memory
        share = sum(1 for d in self._devices() if d == device)
        process = self._ctx.Process(
            target=worker_main, name=f"inference-worker-{index}", daemon=True,
            args=(self.model, device, {**self.engine_options, "memory_share": share}, inbox, outbox))
        process.start()
        worker = _Worker(index, device, process, inbox, outbox, self._loop.create_future())
        # a failure nobody awaits (a replacement's, a second worker's) must not warn "never retrieved"
        worker.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        worker.reader = threading.Thread(target=self._read, args=(worker,), daemon=True,
                                         name=f"inference-reader-{index}")
        worker.reader.start()
        return worker

    async def close(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for timer in self._timers.values():
            timer.cancel()
        workers, self._workers = self._workers, []
        for w in workers:
            w.stopping = True
            self._send(w, ("stop",))
        await asyncio.gather(*(asyncio.to_thread(self._reap, w) for w in workers))
        for q in list(self._requests.values()):
            q.put_nowait(InferenceError("closed", "the inference pool was closed"))

    @staticmethod
    def _reap(w: _Worker) -> None:
        w.process.join(STOP_GRACE_S)
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(STOP_GRACE_S)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        if w.reader is not None and w.reader is not threading.current_thread():
            w.reader.join(2 * READER_POLL_S + 1)
        for q in (w.inbox, w.outbox):
            q.cancel_join_thread()  # never block interpreter exit on a dead pipe
            q.close()

    # ---- worker output ------------------------------------------------------------------

    def _read(self, w: _Worker) -> None:
        """Reader thread: forward every message of one worker to the event loop."""
        assert self._loop is not None
        while True:
            try:
                msg = w.outbox.get(timeout=READER_POLL_S)
            except queue.Empty:
                if w.process.is_alive() and not w.stopping:
                    continue
                if w.stopping:
                    return
                msg = ("exit", w.process.exitcode)
            except Exception as exc:  # a pipe cut mid-message by a killed worker
                msg = ("exit", f"unreadable output ({type(exc).__name__})")
            try:
                self._loop.call_soon_threadsafe(self._on_message, w, msg)
            except RuntimeError:  # the loop is closed
                return
            if msg[0] == "exit":
                return

    def _on_message(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        w.progress_at = time.monotonic()  # outputs, or a step's heartbeat ("alive")
        if kind == "out":
            w.stats = msg[2] if len(msg) > 2 else w.stats
            for out in msg[1]:
                q = self._requests.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
                elif out.finished:
                    self._specs.pop(out.request_id, None)  # prefilled (or refused): no longer queued
        elif kind == "ready":
            w.live, w.live_since = True, time.monotonic()
            w.info = msg[4] if len(msg) > 4 else {}
            if "kv_budget_tokens" in w.info:
                log.info("worker %d: kv budget: %d tokens (%.2f GiB) on %s", w.index, w.info["kv_budget_tokens"],
                         w.info["kv_budget_bytes"] / 1024**3, w.info["device"])
            if not w.ready.done():
                w.ready.set_result(msg[1:])
        elif kind == "load_error":
            log.error("inference worker %d failed to load: %s", w.index, msg[1])
            if not w.ready.done():
                w.ready.set_exception(InferenceError("model_load", msg[1]))
            self._fail(w, InferenceError("worker_died", f"inference worker {w.index} failed to load: {msg[1]}"))
        elif kind == "exit":
            self._on_exit(w, msg[1])

    def _watch(self) -> None:
        """The step watchdog: a live worker with requests in flight and nothing from it for
        `step_timeout_s` is wedged (a hung kernel, a deadlock, SIGSTOP): fail its requests with
        `worker_stalled` and kill it; the reader then sees it exit and it is restarted."""
        assert self._loop is not None
        if self._closing:
            return
        now = time.monotonic()
        for w in self._workers:
            if w.live and not w.stopping and w.inflight and now - w.progress_at > self.step_timeout_s:
                self.stalls += 1
                log.error("inference worker %d made no progress for %.1f s with %d requests in flight: "
                          "killing it (step_timeout_s=%.1f)", w.index, now - w.progress_at, len(w.inflight),
                          self.step_timeout_s)
                w.live, w.stalled = False, True
                self._fail(w, InferenceError("worker_stalled", f"inference worker {w.index} made no progress "
                                             f"for {self.step_timeout_s:.0f} s: restarting it"))
                w.process.kill()
        self._watchdog = self._loop.call_later(min(1.0, self.step_timeout_s / 4), self._watch)

    def _on_exit(self, w: _Worker, code: Any) -> None:
        was_live, w.live, w.dead = w.live or w.stalled, False, True
        if not w.ready.done():
            w.ready.set_exception(InferenceError("model_load", f"worker {w.index} exited while loading (exit {code})"))
        self._fail(w, InferenceError("worker_died", f"inference worker {w.index} died (exit {code})"))
        if self._closing or w.stopping or w not in self._workers or not self._started:
            return  # closing, or start() reports it
        if was_live and time.monotonic() - w.live_since >= STABLE_S:
            w.failures = 0
        w.failures += 1
        base, most = self.restart_backoff_s
        delay = 0.0 if w.failures == 1 else min(most, base * 2 ** (w.failures - 2))
        log.warning("inference worker %d died %s (exit %s): restarting in %.1f s (failure %d in a row)",
                    w.index, "while serving" if was_live else "before it loaded", code, delay, w.failures)
        assert self._loop is not None
        self._loop.run_in_executor(None, self._reap, w)
        w.restart_at = time.monotonic() + delay
        self._timers[w.index] = self._loop.call_later(delay, self._respawn, w)

    def _respawn(self, old: _Worker) -> None:
        self._timers.pop(old.index, None)
        if self._closing or old not in self._workers:
            return
        new = self._spawn(old.index, old.device)
        new.failures = old.failures
        self._workers[self._workers.index(old)] = new
        self.restarts += 1

    def _digest(self, audio: np.ndarray) -> str:
        """`audio_hash`, remembered per array object (a conversation sends the same clips
        every turn); a probe of a few samples guards against an array changed in place."""
        probe = np.ascontiguousarray(audio[:: max(1, audio.size // 32)]).tobytes()
        hit = self._digests.get(id(audio))
        if hit is not None and hit[0]() is audio and hit[1] == audio.size and hit[2] == probe:
            return hit[3]
        if len(self._digests) > 4096:
            self._digests = {k: v for k, v in self._digests.items() if v[0]() is not None}
        digest = audio_hash(np.asarray(audio, dtype=np.float32))
        try:
            self._digests[id(audio)] = (weakref.ref(audio), audio.size, probe, digest)
        except TypeError:  # not weak-referenceable: no memo
            pass
        return digest

    def _by_reference(self, request: GenerationRequest, speculative: bool) -> GenerationRequest:
        covered = self._covered.get(request.session_id)
        audios: list[Any] = list(request.audios)
        if covered:
            for i, audio in enumerate(audios):
                if isinstance(audio, np.ndarray) and audio.ndim == 1 and audio.size:
                    digest = self._digest(audio)
                    if digest in covered:
                        audios[i] = AudioRef(digest, int(audio.size))
        return dataclasses.replace(request, audios=audios, speculative=speculative)

    def _fail(self, w: _Worker, error: InferenceError) -> None:
        for rid in list(w.inflight):
            q = self._requests.get(rid)
            if q is not None:
                q.put_nowait(error)
        w.inflight.clear()
        for sid, index in self._sessions.items():  # a new worker holds no history
            if index == w.index:
                self._covered.pop(sid, None)
        for rid, spec in list(self._specs.items()):
            if spec[0] == w.index:
                del self._specs[rid]

    # ---- requests -----------------------------------------------------------------------

    def _send(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        try:
            w.inbox.put(msg)
        except (ValueError, OSError):  # queue closed: the worker is gone
            pass

    def _route(self, session_id: str) -> _Worker:
        """The session's worker if live, else the least busy live one, else one loading."""
        live = [w for w in self._workers if w.live and not w.stopping]
        for w in live:
            if w.index == self._sessions.get(session_id):
                return w
        loading = [w for w in self._workers if not w.live and not w.dead and not w.stopping]
        candidates = live or loading
        if not candidates:
            waits = [w.restart_at - time.monotonic() for w in self._workers if w.dead]
            when = f"; next restart in {max(0.0, min(waits)):.1f} s" if waits else ""
            raise InferenceError("backend_unavailable", f"no inference worker is running{when}")
        w = min(candidates, key=lambda w: len(w.inflight))
        if self._sessions.get(session_id) != w.index:
            self._covered.pop(session_id, None)
        self._sessions[session_id] = w.index
        return w

    def _check_running(self) -> None:
        if self._loop is None or self._closing:
            raise InferenceError("backend_unavailable", "the inference pool is not running")
        if asyncio.get_running_loop() is not self._loop:  # outputs are routed to start()'s loop
            raise InferenceError("backend_unavailable", "generate() must run on the event loop that called start()")

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncGenerator[str, None]:
        self._check_running()
        if len(self._requests) >= self.max_queue:  # backpressure: refuse now, never queue unboundedly
            raise InferenceError("busy", f"{len(self._requests)} requests in flight (max_queue={self.max_queue})")
        w = self._route(request.session_id)
        for rid, spec in list(self._specs.items()):  # the engine adopts or drops the session's speculation
            if spec[1] == request.session_id:
                del self._specs[rid]
        rid = f"{request.session_id}/{request.turn_id}/{next(self._ids)}"
        q: asyncio.Queue[Output | InferenceError] = asyncio.Queue()
        self._requests[rid] = q
        if not w.inflight:  # idle until now: the watchdog counts from here
            w.progress_at = time.monotonic()
        w.inflight.add(rid)
        self._send(w, ("submit", rid, self._by_reference(request, False)))
        done, resent = False, False
        try:
            while True:
                item = await q.get()
                if isinstance(item, InferenceError):
                    done = True
                    raise item
                if item.finished and item.error and item.error[0] == "audio_missing" and not resent:
                    resent = True  # before any token: send it again with every sample
                    self.audio_resends += 1
                    self._covered.pop(request.session_id, None)
                    self._send(w, ("submit", rid, dataclasses.replace(request, speculative=False)))
                    continue
                if item.finished:
                    done = True
                    if item.cached is not None and self._sessions.get(request.session_id) == w.index:
                        self._covered[request.session_id] = set(item.cached)
                    if stats is not None and item.stats is not None:
                        stats.tokens, stats.prompt_tokens = item.stats.tokens, item.stats.prompt_tokens
                        stats.reused_tokens = item.stats.reused_tokens
                        stats.timings.update(item.stats.timings)
                    if item.error:
                        raise InferenceError(*item.error)
                if item.text:
                    yield item.text
                if done:
                    return
        finally:
            self._requests.pop(rid, None)
            w.inflight.discard(rid)
            if not done and w.live:  # closed early by the caller: stop generating
                self._send(w, ("cancel", rid))

    async def prefill(self, request: GenerationRequest) -> None:
        """Speculative prefill: the worker prefills and keeps it for the commit; fire and forget. One per
        session (a newer one replaces the older), and within `max_queue` with the requests."""
        if self._loop is None or self._closing:
            return
        mine = [rid for rid, spec in self._specs.items() if spec[1] == request.session_id]
        if len(self._requests) + len(self._specs) - len(mine) >= self.max_queue:
            self.speculative_skipped += 1
            log.debug("speculative prefill of %s skipped: %d requests in flight (max_queue=%d)",
                      request.session_id, len(self._requests) + len(self._specs), self.max_queue)
            return
        live = [w for w in self._workers if w.live and w.index == self._sessions.get(request.session_id)]
        try:
            w = live[0] if live else self._route(request.session_id)
        except InferenceError:
            self.speculative_skipped += 1
            return
        if not w.live:  # a loading worker: the commit will come before its load ends
            self.speculative_skipped += 1
            return
        for old in mine:  # the worker replaces it with this one
            del self._specs[old]
        rid = f"{request.session_id}/{request.turn_id}/spec{next(self._ids)}"
        self._specs[rid] = (w.index, request.session_id, request.turn_id)
        self._send(w, ("submit", rid, self._by_reference(request, True)))

    async def drop(self, session_id: str, turn_id: str) -> None:
        for rid, spec in list(self._specs.items()):
            if spec[1:] == (session_id, turn_id):
                del self._specs[rid]
        index = self._sessions.get(session_id)
        for w in self._workers:
            if w.index == index and w.live:
                self._send(w, ("drop_turn", session_id, turn_id))

    async def promote(self, session_id: str, turn_id: str) -> None:
        """The turn of a preemptive `generate` committed: its worker runs it as committed work
        from now on (admitted, prefilled and kept in the batch before other preemptive work)."""
        index = self._sessions.get(session_id)
        for w in self._workers:
            if w.index == index and w.live:
                self._send(w, ("promote", session_id, turn_id))

    async def forget(self, session_id: str) -> None:
        for rid, spec in list(self._specs.items()):
            if spec[1] == session_id:
                del self._specs[rid]
        index = self._sessions.pop(session_id, None)
        self._covered.pop(session_id, None)
        for w in self._workers:
            if w.index == index and w.live:
                self._send(w, ("forget", session_id))
