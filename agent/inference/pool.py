"""`InferencePool`: the local `Backend`, worker processes each running an `Engine`.

One process per GPU (one on the CPU), started with `spawn` so CUDA and torch threads start
clean. Each worker has its own pair of mp queues: a worker killed mid-write can then only
break its own pipes, never another worker's. A reader thread per worker hands outputs to
the event loop (`call_soon_threadsafe`), which routes them to per-request asyncio queues.
A session sticks to one worker while it lives, since its KV cache is there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.inference.engine import Output
from agent.inference.worker import worker_main

log = logging.getLogger(__name__)

READER_POLL_S = 0.2  # how soon a dead worker is noticed
STOP_GRACE_S = 5.0


@dataclass
class _Worker:
    index: int
    device: str | None
    process: Any
    inbox: Any
    outbox: Any
    ready: asyncio.Future[tuple[str, str | None, int]]
    inflight: set[str] = field(default_factory=set)
    stopping: bool = False
    live: bool = False  # loaded and not dead
    reader: threading.Thread | None = None


class InferencePool:
    name = "local"

    def __init__(self, model: str = "auto", workers: int | None = None, max_batch: int = 16,
                 max_queue: int = 64, device: str | None = None, kv_budget_tokens: int = 32768,
                 start_timeout: float = 600.0) -> None:
        self.model = model
        self.model_name = model
        self.tokenizer: Any = None  # loaded in this process at start(), for exact prompt budgets
        self.warning: str | None = None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.kv_budget_tokens = kv_budget_tokens
        self.start_timeout = start_timeout
        self._workers_wanted = workers
        self._device = device
        self._workers: list[_Worker] = []
        self._requests: dict[str, asyncio.Queue[Output | InferenceError]] = {}
        self._sessions: dict[str, int] = {}  # session → worker index
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: Any = None
        self._closing = False
        self.restarts = 0

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
        except asyncio.TimeoutError:
            await self.close()
            raise InferenceError("model_load", f"model {self.model!r} did not load in {self.start_timeout:.0f} s")
        self.model_name, self.warning, _ = results[0]
        from agent.inference.models import load_tokenizer

        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_name)

    def _spawn(self, index: int, device: str | None) -> _Worker:
        assert self._loop is not None
        inbox, outbox = self._ctx.Queue(), self._ctx.Queue()
        process = self._ctx.Process(
            target=worker_main, name=f"inference-worker-{index}", daemon=True,
            args=(self.model, device, self.max_batch, self.kv_budget_tokens, inbox, outbox))
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
        workers, self._workers = self._workers, []
        for w in workers:
            w.stopping = True
            self._send(w, ("stop",))
        await asyncio.gather(*(asyncio.to_thread(self._reap, w) for w in workers))
        for rid, q in list(self._requests.items()):
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
        if w.reader is not None:
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
        if kind == "out":
            for out in msg[1]:
                q = self._requests.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
        elif kind == "ready":
            w.live = True
            if not w.ready.done():
                w.ready.set_result((msg[1], msg[2], msg[3]))
        elif kind == "load_error":
            w.stopping = True
            if not w.ready.done():
                w.ready.set_exception(InferenceError("model_load", msg[1]))
            self._fail(w, InferenceError("worker_died", f"worker {w.index} failed to reload: {msg[1]}"))
        elif kind == "exit":
            self._on_exit(w, msg[1])

    def _on_exit(self, w: _Worker, code: Any) -> None:
        was_live, w.live = w.live, False
        if not w.ready.done():
            w.ready.set_exception(InferenceError("model_load", f"worker {w.index} exited while loading (exit {code})"))
        self._fail(w, InferenceError("worker_died", f"inference worker {w.index} died (exit {code})"))
        if self._closing or w.stopping or w not in self._workers or not was_live:
            return
        log.warning("inference worker %d died (exit %s): restarting", w.index, code)
        self.restarts += 1
        asyncio.get_running_loop().run_in_executor(None, self._reap, w)
        self._workers[self._workers.index(w)] = self._spawn(w.index, w.device)

    def _fail(self, w: _Worker, error: InferenceError) -> None:
        for rid in list(w.inflight):
            q = self._requests.get(rid)
            if q is not None:
                q.put_nowait(error)
        w.inflight.clear()

    # ---- requests -----------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not finished (all workers)."""
        return len(self._requests)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _send(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        try:
            w.inbox.put(msg)
        except (ValueError, OSError):  # queue closed: the worker is gone
            pass

    def _route(self, session_id: str) -> _Worker:
        usable = [w for w in self._workers if not w.stopping]
        if not usable:
            raise InferenceError("unavailable", "no inference worker is running")
        index = self._sessions.get(session_id)
        for w in usable:
            if w.index == index:
                return w
        w = min(usable, key=lambda w: len(w.inflight))
        self._sessions[session_id] = w.index
        return w

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncIterator[str]:
        if self._loop is None or self._closing:
            raise InferenceError("unavailable", "the inference pool is not running")
        if asyncio.get_running_loop() is not self._loop:  # outputs are routed to start()'s loop
            raise InferenceError("unavailable", "generate() must run on the event loop that called start()")
        if len(self._requests) >= self.max_queue:  # backpressure: refuse now, never queue unboundedly
            raise InferenceError("busy", f"{len(self._requests)} requests in flight (max_queue={self.max_queue})")
        w = self._route(request.session_id)
        rid = f"{request.session_id}/{request.turn_id}/{next(self._ids)}"
        q: asyncio.Queue[Output | InferenceError] = asyncio.Queue()
        self._requests[rid] = q
        w.inflight.add(rid)
        self._send(w, ("submit", rid, dataclasses.replace(request, speculative=False)))
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, InferenceError):
                    done = True
                    raise item
                if item.finished:
                    done = True
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
        """Speculative prefill: the worker prefills and holds; fire and forget."""
        if self._loop is None or self._closing:
            return
        w = self._route(request.session_id)
        rid = f"{request.session_id}/{request.turn_id}/spec{next(self._ids)}"
        self._send(w, ("submit", rid, dataclasses.replace(request, speculative=True)))

    async def drop(self, session_id: str, turn_id: str) -> None:
        index = self._sessions.get(session_id)
        for w in self._workers:
            if w.index == index:
                self._send(w, ("drop_turn", session_id, turn_id))

    async def forget(self, session_id: str) -> None:
        index = self._sessions.pop(session_id, None)
        for w in self._workers:
            if w.index == index:
                self._send(w, ("forget", session_id))
