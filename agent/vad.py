"""One Silero VAD for every session of the process, evaluated over a batch of streams.

Per-stream ONNX sessions (what LiveKit and Pipecat do) pay the model's fixed cost once per
stream per 32 ms chunk. Silero's TorchScript network runs a whole batch at once if the
caller keeps each stream's recurrent state ([2, 1, 128]) and its last 64 samples of
context, so the service gathers one pending chunk per stream per tick and runs them
together on a single worker thread, off the event loop.

Importing this module loads nothing: torch and the model load on first use.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE

log = logging.getLogger(__name__)

CHUNK = 512  # samples at 16 kHz (32 ms): the only chunk size Silero takes at 16 kHz
CONTEXT = 64  # samples of the previous chunk the model sees before each chunk


@dataclass
class StreamState:
    """What Silero remembers about one stream between chunks.

    numpy, not torch: stacking and slicing small numpy arrays costs far less per stream.
    """

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))


class BatchedSilero:
    """Pure and synchronous: the batched forward pass with explicit per-stream state."""

    def __init__(self) -> None:
        import torch
        from silero_vad import load_silero_vad

        self._torch = torch
        # `_model` is the 16 kHz network without the wrapper's hidden single-stream state:
        # forward(x [B, 64 + 512], state [2, B, 128]) -> (probs [B, 1], state [2, B, 128]).
        with warnings.catch_warnings():  # torch 2.9+ calls torch.jit deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            model = load_silero_vad(onnx=False)._model.eval()
            try:  # folds constants and fuses ops: ~20 % faster, outputs equal to 1e-6 (tested)
                model = torch.jit.optimize_for_inference(torch.jit.freeze(model))
            except Exception:  # pragma: no cover - a torch that cannot freeze it runs it as is
                log.debug("torch.jit.freeze failed; running the scripted model unfrozen", exc_info=True)
        self._model = model

    def new_state(self) -> StreamState:
        return StreamState()

    def forward(self, chunks: np.ndarray, states: list[StreamState]) -> np.ndarray:
        """chunks: float32 [B, 512]; updates each state in place; returns probs float32 [B]."""
        if chunks.ndim != 2 or chunks.shape != (len(states), CHUNK):
            raise ValueError(f"chunks must be [{len(states)}, {CHUNK}], got {list(chunks.shape)}")
        if not states:
            return np.zeros(0, np.float32)
        torch = self._torch
        x = np.empty((len(states), CONTEXT + CHUNK), np.float32)
        x[:, :CONTEXT] = [s.context for s in states]
        x[:, CONTEXT:] = chunks
        state = np.concatenate([s.state for s in states], axis=1)  # [2, B, 128]
        with torch.inference_mode():
            probs, new_state = self._model(torch.from_numpy(x), torch.from_numpy(state))
        new = new_state.numpy()
        for i, s in enumerate(states):
            # Views into this batch's arrays: no per-stream copy; the next forward copies them.
            s.state = new[:, i : i + 1]
            s.context = x[i, -CONTEXT:]
        return probs.numpy().reshape(-1).astype(np.float32, copy=True)


class _Request:
    """One `process()` call: the probabilities of its chunks, filled in tick by tick."""

    __slots__ = ("future", "probs", "filled")

    def __init__(self, future: asyncio.Future[np.ndarray], n: int) -> None:
        self.future = future
        self.probs = np.empty(n, np.float32)
        self.filled = 0


class VADStream:
    """One session's view of the service: push audio, get one probability per chunk."""

    def __init__(self, service: VADService, state: StreamState) -> None:
        self._service = service
        self.state = state
        self._buffer = np.zeros(0, np.float32)  # < 512 samples not yet making a chunk
        self._chunks: deque[np.ndarray] = deque()  # chunks waiting for a tick, in order
        self._requests: deque[_Request] = deque()  # their callers, in the same order
        self.closed = False

    @property
    def pending(self) -> int:
        """Chunks queued and not yet scored."""
        return len(self._chunks)

    async def process(self, samples: np.ndarray) -> np.ndarray:
        """Float32 16 kHz mono of any length; returns a probability per completed chunk.

        Samples short of a whole chunk wait in the stream for the next call. Closing the
        stream while a call waits cancels that call (the awaiting task sees CancelledError).
        """
        if self.closed:
            raise RuntimeError("VAD stream is closed")
        samples = np.asarray(samples, np.float32).reshape(-1)
        buf = np.concatenate([self._buffer, samples]) if self._buffer.size else samples
        n = buf.size // CHUNK
        self._buffer = buf[n * CHUNK :].copy()  # at most 511 samples, kept for the next call
        if n == 0:
            return np.zeros(0, np.float32)
        whole = buf[: n * CHUNK].reshape(n, CHUNK)
        if buf is samples:
            whole = whole.copy()  # the caller's array may change before the ticks reach it
        # Queued before any await, so concurrent calls on one stream keep their order.
        self._chunks.extend(whole)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(future, n))
        self._service._enqueue(self)
        await self._service._ensure_started()
        return await future

    def close(self) -> None:
        """Leave the service; calls still waiting are cancelled. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for request in self._requests:
            request.future.cancel()
        self._requests.clear()
        self._chunks.clear()
        self._service._forget(self)

    # ---- called by the service, on the event loop ---------------------------------
    def _deliver(self, prob: float) -> None:
        request = self._requests[0]
        request.probs[request.filled] = prob
        request.filled += 1
        if request.filled == request.probs.size:
            self._requests.popleft()
            if not request.future.done():  # the caller may have been cancelled
                request.future.set_result(request.probs)

    def _fail(self, exc: BaseException) -> None:
        """The chunk at the head failed: its whole call fails, later calls go on."""
        request = self._requests.popleft()
        for _ in range(request.probs.size - request.filled - 1):
            self._chunks.popleft()  # the rest of that call's chunks, the head is gone already
        if not request.future.done():
            request.future.set_exception(exc)


class VADService:
    """Ticks all open streams together: at most one chunk per stream per tick."""

    def __init__(self, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self._model: BatchedSilero | None = None
        self._streams: set[VADStream] = set()
        # Streams with queued chunks, as an ordered set: served streams move to the back,
        # so with more than max_batch of them every stream waits at most a few ticks.
        self._ready: dict[VADStream, None] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self.ticks = 0
        self.chunks = 0
        self.last_batch = 0

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "chunks": self.chunks,
            "mean_batch_size": self.chunks / self.ticks if self.ticks else 0.0,
            "last_batch_size": self.last_batch,
            "streams": len(self._streams),
            "pending_streams": len(self._ready),
        }

    async def start(self) -> None:
        """Load the model (on the worker thread) and start ticking. Idempotent."""
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._task is not None:
            return
        if self._starting is None:  # concurrent first callers share one load
            self._starting = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._starting)
        except BaseException:
            if self._starting.done():
                self._starting = None  # a failed load may be retried
            raise

    async def _start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="vad")
        if self._model is None:
            self._model = await asyncio.get_running_loop().run_in_executor(self._executor, BatchedSilero)
        self._wakeup = asyncio.Event()
        if self._ready:
            self._wakeup.set()
        self._task = asyncio.create_task(self._run(), name="vad-service")
        self._task.add_done_callback(_log_crash)

    async def close(self) -> None:
        """Close every stream and stop ticking; `start()` may run again afterwards."""
        for stream in list(self._streams):
            stream.close()
        for task in (self._starting, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._starting = self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # a batch in flight finishes on its own
            self._executor = None

    def open_stream(self) -> VADStream:
        """A new stream; the model loads on `start()` or on the stream's first chunk."""
        stream = VADStream(self, StreamState())
        self._streams.add(stream)
        return stream

    def _enqueue(self, stream: VADStream) -> None:
        self._ready.setdefault(stream)
        if self._wakeup is not None:
            self._wakeup.set()

    def _forget(self, stream: VADStream) -> None:
        self._streams.discard(stream)
        self._ready.pop(stream, None)

    async def _run(self) -> None:
        assert self._wakeup is not None and self._model is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        model, executor = self._model, self._executor
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._ready:
                batch = list(itertools.islice(self._ready, self.max_batch))
                chunks = np.stack([s._chunks[0] for s in batch])
                states = [s.state for s in batch]
                try:
                    probs = await loop.run_in_executor(executor, model.forward, chunks, states)
                except Exception as exc:  # keep serving; the waiting calls see the error
                    log.exception("VAD batch of %d failed", len(batch))
                    for s in batch:
                        if not s.closed:
                            s._chunks.popleft()
                            s._fail(exc)
                    self._requeue(batch)
                    continue
                self.ticks += 1
                self.chunks += len(batch)
                self.last_batch = len(batch)
                for s, p in zip(batch, probs):
                    if s.closed:
                        continue  # closed while its batch ran: nothing waits for it
                    s._chunks.popleft()
                    s._deliver(float(p))
                self._requeue(batch)

    def _requeue(self, batch: list[VADStream]) -> None:
        for s in batch:
            self._ready.pop(s, None)
            if s._chunks and not s.closed:
                self._ready[s] = None  # to the back of the line


def _log_crash(task: asyncio.Task[None]) -> None:
    # The tick loop only ends by close(); anything else would leave every stream waiting.
    if not task.cancelled() and task.exception() is not None:
        log.error("VAD service stopped", exc_info=task.exception())
