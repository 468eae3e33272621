"""One Silero VAD for every session of the process, evaluated over a batch of streams.

Per-stream ONNX sessions (what LiveKit and Pipecat do) pay the model's fixed cost once per
stream per 32 ms chunk. Silero's network runs a whole batch at once if the caller keeps each
stream's recurrent state ([2, 1, 128]) and its last 64 samples of context, so the service
gathers one pending chunk per stream per tick and runs them together on a single worker
thread, off the event loop. What `bench vad` measured (CPU µs per stream per chunk, 1 thread)
decided the details:

- Backend by batch size: onnxruntime has the lower fixed cost per call (B=1 ~115 µs against
  ~210 for TorchScript), frozen TorchScript the better kernels (B=256 ~16 µs per stream
  against ~38). They cross near B=24; both are the same network (the ONNX file is the one
  livekit-plugins-silero ships) and agree to ~1e-5, so a stream may move between them.
- Digital silence (a chunk and its context all exactly 0.0: muted tracks, padded files) skips
  the convolutional encoder, whose output on zeros is a constant computed once at load; the
  model's own recurrent decoder still runs on that constant, so probabilities and state are
  the same as the full network's (bit for bit in the tests). Freezing the state instead was
  measured and rejected: the LSTM keeps drifting through silence (its cell reaches ~17 over
  8 s), and a frozen state moved probabilities at the next speech onset by up to 0.5. A
  silent row costs ~3-5 µs instead of ~16; a tick is split into silent and other rows only
  when whole (all silent) or when >= 64 rows are silent, where the second call pays.
- Per-stream Python is kept out of a tick: state and context live in one array indexed by
  slot (gathered and scattered with one numpy call each), and a chunk is placed in its tick
  when it arrives, so a tick's work is a handful of array operations and one `set_result`
  per waiting call.

Importing this module loads nothing: torch, onnxruntime and the model load on first use.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE

log = logging.getLogger(__name__)

_EMPTY = np.zeros(0, np.float32)
CHUNK = 512  # samples at 16 kHz (32 ms): the only chunk size Silero takes at 16 kHz
CONTEXT = 64  # samples of the previous chunk the model sees before each chunk
WIDTH = CONTEXT + CHUNK  # one row of the network's input
ONNX_BELOW = 24  # batches smaller than this run on onnxruntime (measured crossover)
SPLIT_MIN_SILENT = 64  # silent rows that pay for running them apart from the rest of a batch


@dataclass
class StreamState:
    """What Silero remembers about one stream between chunks (for `BatchedSilero.forward`)."""

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))


class BatchedSilero:
    """Pure and synchronous: the batched network with explicit per-stream state."""

    def __init__(self, onnx_below: int = ONNX_BELOW) -> None:
        import torch
        from silero_vad import load_silero_vad

        self._torch = torch
        # `_model` is the 16 kHz network without the wrapper's hidden single-stream state:
        # forward(x [B, 64 + 512], state [2, B, 128]) -> (probs [B, 1], state [2, B, 128]).
        with warnings.catch_warnings():  # torch 2.9+ calls torch.jit deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = load_silero_vad(onnx=False)._model.eval()
            with torch.inference_mode():
                # The encoder's output on all-zero input: the same for every silent chunk.
                self._silent_features = scripted.encoder(scripted.run_extractors(torch.zeros(1, WIDTH)))
            self._model = _frozen(torch, scripted)
            self._decoder = _frozen(torch, scripted.decoder)
        self._onnx = _onnx_session() if onnx_below > 1 else None
        self.onnx_below = onnx_below if self._onnx is not None else 0
        self._sr = np.array(SAMPLE_RATE, np.int64)

    def new_state(self) -> StreamState:
        return StreamState()

    def backend(self, batch: int) -> str:
        """Which runtime a batch of this many non-silent rows runs on."""
        return "onnxruntime" if batch < self.onnx_below else "torchscript"

    def run(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The whole network: x float32 [B, 576], state [2, B, 128] -> (probs [B], state)."""
        state = np.ascontiguousarray(state)
        if x.shape[0] < self.onnx_below:
            assert self._onnx is not None
            probs, new = self._onnx.run(None, {"input": np.ascontiguousarray(x), "state": state, "sr": self._sr})
            return probs.reshape(-1), new
        torch = self._torch
        with torch.inference_mode():
            p, s = self._model(torch.from_numpy(x), torch.from_numpy(state))
        return p.numpy().reshape(-1), s.numpy()

    def run_silent(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network on all-zero rows: only the recurrent decoder runs, on the constant
        encoder output. Same ops as the model's forward after its encoder."""
        torch = self._torch
        with torch.inference_mode():
            features = self._silent_features.expand(state.shape[1], -1, -1)
            out, s = self._decoder(features, torch.from_numpy(state))
            p = torch.mean(torch.squeeze(out, 1), [1])
        return p.numpy().reshape(-1), s.numpy()

    def step(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """`run` with the silence gate: (probs [B] float32, new state, rows run without encoder).

        A batch is split only where that pays (measured): a second call and the smaller
        batch cost more than the encoder of a few silent rows, and switching between
        onnxruntime and torch in one tick evicts the other's weights from the cache.
        """
        silent = ~x.any(axis=1)
        n_silent = int(np.count_nonzero(silent))
        if n_silent == x.shape[0]:
            probs, new = self.run_silent(state)
        elif n_silent < SPLIT_MIN_SILENT:
            probs, new = self.run(x, state)
            n_silent = 0
        else:
            loud = ~silent
            probs = np.empty(x.shape[0], np.float32)
            new = np.empty_like(state)
            probs[loud], new[:, loud] = self.run(x[loud], state[:, loud])
            probs[silent], new[:, silent] = self.run_silent(np.ascontiguousarray(state[:, silent]))
        return probs.astype(np.float32, copy=False), new, n_silent

    def forward(self, chunks: np.ndarray, states: list[StreamState]) -> np.ndarray:
        """chunks: float32 [B, 512]; updates each state in place; returns probs float32 [B]."""
        if chunks.ndim != 2 or chunks.shape != (len(states), CHUNK):
            raise ValueError(f"chunks must be [{len(states)}, {CHUNK}], got {list(chunks.shape)}")
        if not states:
            return np.zeros(0, np.float32)
        x = np.empty((len(states), WIDTH), np.float32)
        x[:, :CONTEXT] = [s.context for s in states]
        x[:, CONTEXT:] = chunks
        state = np.concatenate([s.state for s in states], axis=1)  # [2, B, 128]
        probs, new, _ = self.step(x, state)
        for i, s in enumerate(states):
            # Views into this batch's arrays: no per-stream copy; the next forward copies them.
            s.state = new[:, i : i + 1]
            s.context = x[i, -CONTEXT:]
        return probs.copy()


def _frozen(torch: Any, module: Any) -> Any:
    try:  # folds constants and fuses ops: ~20 % faster, outputs equal to 1e-6 (tested)
        return torch.jit.optimize_for_inference(torch.jit.freeze(module))
    except Exception:  # pragma: no cover - a torch that cannot freeze it runs it as is
        log.debug("torch.jit.freeze failed; running the scripted module unfrozen", exc_info=True)
        return module


def _onnx_session() -> Any:
    """Silero's ONNX file as livekit-plugins-silero runs it: one thread, no spinning."""
    try:
        import importlib.resources

        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: small VAD batches run on TorchScript")
        return None
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    path = importlib.resources.files("silero_vad.data").joinpath("silero_vad.onnx")
    with importlib.resources.as_file(path) as file:
        return onnxruntime.InferenceSession(str(file), sess_options=opts, providers=["CPUExecutionProvider"])


class _Tick:
    """One batch in the making: one row per stream, at most `max_batch` rows."""

    __slots__ = ("number", "streams", "slots", "chunks", "waiters", "probs", "error", "bad", "has_closed")

    def __init__(self, number: int) -> None:
        self.number = number
        self.streams: list[VADStream] = []
        self.slots: list[int] = []
        self.chunks: list[np.ndarray] = []
        self.waiters: list[asyncio.Future[None]] = []  # calls whose last chunk is here
        self.probs: np.ndarray | None = None  # by row, once run
        self.error: BaseException | None = None  # the whole batch failed
        self.bad: set[int] | None = None  # rows whose samples were not finite
        self.has_closed = False  # a stream with a row here closed before the tick ran


class VADStream:
    """One session's view of the service: push audio, get one probability per chunk."""

    def __init__(self, service: VADService, slot: int) -> None:
        self._service = service
        self._slot = slot  # row of this stream's state and context in the service's arrays
        self._buffer = _EMPTY  # < 512 samples not yet making a chunk
        self._last_tick = -1  # the latest tick holding a chunk of this stream
        self._waiters: deque[asyncio.Future[None]] = deque()  # this stream's waiting calls
        self.closed = False

    @property
    def pending(self) -> int:
        """Chunks queued and not yet scored."""
        return sum(t.streams.count(self) for t in self._service._ticks) if not self.closed else 0

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
        # At most 511 samples, kept for the next call.
        self._buffer = buf[n * CHUNK :].copy() if buf.size > n * CHUNK else _EMPTY
        if n == 0:
            return np.zeros(0, np.float32)
        whole = buf[: n * CHUNK].reshape(n, CHUNK)
        if buf is samples:
            whole = whole.copy()  # the caller's array may change before the ticks reach it
        service = self._service
        # Placed before any await, so concurrent calls on one stream keep their order.
        parts = [service._place(self, chunk) for chunk in whole] if n > 1 else [service._place(self, whole[0])]
        last = parts[-1][0]
        waiter: asyncio.Future[None] = (service._loop or asyncio.get_running_loop()).create_future()
        last.waiters.append(waiter)
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        self._waiters.append(waiter)
        if service._task is None:
            await service._ensure_started()
        await waiter
        if n == 1:
            row = parts[0][1]
            if last.error is not None or last.bad is not None:
                _check(last, row)
            assert last.probs is not None
            return last.probs[row : row + 1].copy()
        out = np.empty(n, np.float32)
        for i, (tick, row) in enumerate(parts):  # every tick up to `last` has run
            _check(tick, row)
            assert tick.probs is not None
            out[i] = tick.probs[row]
        return out

    def close(self) -> None:
        """Leave the service; calls still waiting are cancelled. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        self._service._forget(self)


def _check(tick: _Tick, row: int) -> None:
    if tick.error is not None:
        raise tick.error
    if tick.bad is not None and row in tick.bad:
        raise ValueError("VAD samples must be finite: NaN or infinity given")


class VADService:
    """Ticks all open streams together: at most one chunk per stream per tick."""

    def __init__(self, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self._model: BatchedSilero | None = None
        self._streams: set[VADStream] = set()
        # Ticks not yet run, oldest first; `_base` is the number of `_ticks[0]`. A chunk joins
        # the oldest tick after its stream's previous chunk that has room, so a stream with a
        # backlog takes one row per tick and never holds up the others.
        self._ticks: deque[_Tick] = deque()
        self._base = 0
        # Per-slot model memory; a closed stream's slot is reused once no running tick holds it.
        self._state = np.zeros((2, 0, 128), np.float32)
        self._context = np.zeros((0, CONTEXT), np.float32)
        self._free: list[int] = []
        self._released: list[int] = []
        self._running = False
        self._executor: ThreadPoolExecutor | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the service ticks on
        self._starting: asyncio.Task[None] | None = None
        self.ticks = 0
        self.chunks = 0
        self.silent_chunks = 0
        self.failed_chunks = 0
        self.last_batch = 0

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "chunks": self.chunks,
            "silent_chunks": self.silent_chunks,  # scored without the encoder (digital silence)
            "failed_chunks": self.failed_chunks,
            "mean_batch_size": self.chunks / self.ticks if self.ticks else 0.0,
            "last_batch_size": self.last_batch,
            "streams": len(self._streams),
            "pending_streams": len({s for t in self._ticks for s in t.streams if not s.closed}),
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
        self._loop = asyncio.get_running_loop()
        if self._ticks:
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
        self._loop = None
        self._ticks.clear()
        self._running = False
        self._free += self._released
        self._released.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # a batch in flight finishes on its own
            self._executor = None

    def open_stream(self) -> VADStream:
        """A new stream; the model loads on `start()` or on the stream's first chunk."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._state[:, slot] = 0.0
        self._context[slot] = 0.0
        stream = VADStream(self, slot)
        self._streams.add(stream)
        return stream

    def _grow(self) -> None:
        old = self._context.shape[0]
        new = max(16, 2 * old)
        state = np.zeros((2, new, 128), np.float32)
        context = np.zeros((new, CONTEXT), np.float32)
        state[:, :old] = self._state
        context[:old] = self._context
        self._state, self._context = state, context
        self._free += range(new - 1, old - 1, -1)  # lowest slots first: pop() takes from the end

    def _place(self, stream: VADStream, chunk: np.ndarray) -> tuple[_Tick, int]:
        """Put one chunk in the oldest tick after the stream's previous chunk that has room."""
        ticks = self._ticks
        i = stream._last_tick + 1 - self._base
        if i < 0:
            i = 0
        while i < len(ticks) and len(ticks[i].streams) >= self.max_batch:
            i += 1
        if i == len(ticks):
            ticks.append(_Tick(self._base + i))
            if self._wakeup is not None:
                self._wakeup.set()
        tick = ticks[i]
        row = len(tick.streams)
        tick.streams.append(stream)
        tick.slots.append(stream._slot)
        tick.chunks.append(chunk)
        stream._last_tick = tick.number
        return tick, row

    def _forget(self, stream: VADStream) -> None:
        self._streams.discard(stream)
        for tick in self._ticks:
            if tick.number > stream._last_tick:
                break
            tick.has_closed = True
        # A running tick may still write this slot back: reuse it only after that tick.
        (self._released if self._running else self._free).append(stream._slot)

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._ticks:
                tick = self._ticks.popleft()
                self._base += 1
                self._running = True
                try:
                    await self._execute(tick)
                except Exception as exc:  # a bug in one tick fails its calls, never the service:
                    log.exception("VAD tick failed")  # a stopped service would hang every session
                    self.failed_chunks += len(tick.streams)
                    tick.error = exc
                finally:
                    self._running = False
                    self._free += self._released
                    self._released.clear()
                for waiter in tick.waiters:
                    if not waiter.done():  # a caller may have been cancelled
                        waiter.set_result(None)

    async def _execute(self, tick: _Tick) -> None:
        assert self._model is not None and self._executor is not None
        rows = np.arange(len(tick.streams))
        if tick.has_closed:  # leave out the rows of streams closed since they were queued
            rows = rows[[not s.closed for s in tick.streams]]
        if not rows.size:  # every stream of this tick closed meanwhile: nothing to score
            tick.probs = np.zeros(len(tick.streams), np.float32)
            return
        chunks = tick.chunks if rows.size == len(tick.chunks) else [tick.chunks[i] for i in rows]
        slots = np.array(tick.slots, np.intp)[rows]
        x = np.empty((slots.size, WIDTH), np.float32)
        x[:, :CONTEXT] = self._context[slots]
        x[:, CONTEXT:] = chunks
        if not np.isfinite(x).all():  # those calls fail; their streams keep state and context
            finite = np.isfinite(x).all(axis=1)
            tick.bad = set(rows[~finite].tolist())
            self.failed_chunks += len(tick.bad)
            log.warning("VAD refused %d chunk(s) with NaN or infinity; their calls fail", len(tick.bad))
            rows, slots, x = rows[finite], slots[finite], x[finite]
        probs = np.zeros(len(tick.streams), np.float32)
        tick.probs = probs
        if not slots.size:
            return
        try:
            got, new, silent = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._model.step, x, self._state[:, slots])
        except Exception as exc:  # keep serving; the calls waiting on this tick see the error
            log.exception("VAD batch of %d failed", slots.size)
            self.failed_chunks += slots.size
            tick.error = exc
            return
        # Rows of streams closed meanwhile write to slots nobody reuses before this tick ends.
        self._state[:, slots] = new
        self._context[slots] = x[:, -CONTEXT:]
        probs[rows] = got
        self.ticks += 1
        self.chunks += slots.size
        self.silent_chunks += silent
        self.last_batch = slots.size


def _log_crash(task: asyncio.Task[None]) -> None:
    # The tick loop only ends by close(); anything else would leave every stream waiting.
    if not task.cancelled() and task.exception() is not None:
        log.error("VAD service stopped", exc_info=task.exception())
