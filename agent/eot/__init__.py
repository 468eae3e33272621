"""End-of-turn models: is the speaker done, or only pausing? One batched service per process.

A model (`EndOfTurnModel`) scores clips (the turn so far, 16 kHz) with P(turn complete),
synchronously and in batches. `EndOfTurnService` owns one model for every session of the
process: a session in silence asks once (`predict`), and each tick runs one model call for
all sessions waiting, on a thread of its own, off the event loop — the shape of the VAD
service (`agent.vad`). Models are found through the `voice_agent.turn_detectors` entry-point
group (`smart-turn`: `agent.eot.smart_turn`), so a package can add one.

The turn state machine (`agent.turns`) decides with the verdict: complete commits after
`turns.min_silence_s_complete`, incomplete waits up to `turns.max_silence_s`, no verdict
(model off, failed, late) keeps the fixed `turns.min_silence_s`.

Importing this package loads nothing: the model loads on `start()`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "voice_agent.turn_detectors"
SILENCE = "silence"  # turns.end_of_turn: the fixed rule, no model


class EndOfTurnModel(Protocol):
    """Pure and synchronous; runs on the service's thread."""

    name: str

    def predict(self, clips: list[np.ndarray]) -> np.ndarray:
        """16 kHz mono float32 clips (each the turn so far) → P(complete) per clip, float [B]."""
        ...


# Ours, also declared as entry points (pyproject.toml): found even where the installed metadata is older.
BUILTIN = {"smart-turn": "agent.eot.smart_turn:SmartTurn", "smart-turn-prosody": "agent.eot.policy:SmartTurnProsody"}


def _entry_points() -> dict[str, str]:
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return {**BUILTIN, **found}


def available_detectors() -> list[str]:
    return sorted(_entry_points())


def detector_factory(name: str) -> Callable[[], EndOfTurnModel]:
    """The class (or factory) an entry point names; ValueError for an unknown name."""
    eps = _entry_points()
    if name not in eps:
        known = ", ".join([SILENCE, *sorted(eps)])
        raise ValueError(f"unknown end-of-turn detector {name!r}; available: {known}")
    factory: Callable[[], EndOfTurnModel] = importlib.metadata.EntryPoint(name, eps[name], ENTRY_POINT_GROUP).load()
    return factory


_loaded: dict[Callable[[], EndOfTurnModel], EndOfTurnModel] = {}
_loading = threading.Lock()


def load_shared(factory: Callable[[], EndOfTurnModel]) -> EndOfTurnModel:
    """One model per factory per process: runtimes (and the tests' many) share a loaded model;
    models are pure (`predict` keeps no state between calls) and ONNX sessions run concurrently."""
    with _loading:
        if factory not in _loaded:
            _loaded[factory] = factory()
        return _loaded[factory]


class PendingVerdict:
    """One session's question to the service, asked when silence begins. Audio goes on while
    the model thinks (a preemptive answer starts meanwhile); the detector waits for the
    verdict only where it decides: before the chunk that would make the silence long enough
    to commit a complete turn — so live input and files fed faster than real time decide alike."""

    def __init__(self, t: float, call: asyncio.Task[float | None]) -> None:
        self.t = t  # the silence's start (SilenceBegan.t)
        self.call = call

    def needed(self, silence_s: float, chunk_s: float, min_silence_s_complete: float) -> bool:
        return self.call.done() or silence_s + chunk_s >= min_silence_s_complete

    async def result(self) -> float | None:
        try:
            return await self.call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the waiter itself is cancelled
            return None  # the question was withdrawn (its session closed): no verdict
        except Exception as exc:  # the fixed rule decides
            log.warning("end-of-turn model failed (%s): fixed silence rule", exc)
            return None


class EndOfTurnService:
    """One model, every session: `await predict(audio)` → P(complete), or None when it failed."""

    def __init__(self, factory: Callable[[], EndOfTurnModel], max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._factory = factory
        self.max_batch = max_batch
        self._model: EndOfTurnModel | None = None
        self._pending: list[tuple[np.ndarray, asyncio.Future[float | None]]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.calls = 0  # model calls (ticks)
        self.clips = 0  # clips scored
        self.failed = 0  # clips whose call failed (the fixed rule decided those turns)
        self.last_batch = 0

    @property
    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "clips": self.clips, "failed": self.failed, "last_batch_size": self.last_batch,
                "mean_batch_size": self.clips / self.calls if self.calls else 0.0}

    async def start(self) -> None:
        """Load the model on the service's thread and start ticking. Idempotent."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="end-of-turn")
        self._model = await asyncio.get_running_loop().run_in_executor(self._executor, load_shared, self._factory)
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="end-of-turn")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def predict(self, audio: np.ndarray) -> float | None:
        """P(the turn in `audio` is complete); None when the model failed (logged, counted)."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("end-of-turn service is not started")
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._pending.append((np.asarray(audio, np.float32).reshape(-1), future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        assert self._wakeup is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                batch = [(clip, f) for clip, f in batch if not f.done()]  # callers gone meanwhile
                if not batch:
                    continue
                try:
                    probs = await loop.run_in_executor(self._executor, self._score, [c for c, _ in batch])
                except Exception:
                    log.exception("end-of-turn model failed on a batch of %d", len(batch))
                    self.failed += len(batch)
                    probs = None
                self.calls += 1
                self.clips += len(batch)
                self.last_batch = len(batch)
                for i, (_, future) in enumerate(batch):
                    if not future.done():
                        future.set_result(None if probs is None else float(probs[i]))

    def _score(self, clips: list[np.ndarray]) -> np.ndarray:
        assert self._model is not None
        probs = np.asarray(self._model.predict(clips), np.float64).reshape(-1)
        if probs.size != len(clips) or not np.isfinite(probs).all():
            raise ValueError(f"end-of-turn model gave {probs.size} scores for {len(clips)} clips")
        return probs
