"""`voice-agent bench vad`: CPU cost of voice-activity detection per stream, side by side.

All in one run, on one torch / onnxruntime thread, on the same 16 kHz audio (espeak-ng
speech with digital-silence pauses when espeak-ng is installed, else a labelled synthetic
signal), at 1, 8, 64 and 256 streams:

(a) our `BatchedSilero.forward`, one call per tick over B streams (the bare batched model);
(b) livekit-plugins-silero's per-stream model: the ONNX session `VAD.load()` makes, one
    `OnnxModel` (own state and context) per stream, one call per stream per chunk. Timed on
    the model call alone, which favours LiveKit: its `VADStream` also hops to a thread pool
    for every chunk of every stream, int16-converts, and buffers speech;
(b') the same calls as LiveKit's `VADStream` makes them: each stream awaits
    `loop.run_in_executor(None, model, chunk)` per chunk (its resampling, int16 conversion
    and event plumbing still left out);
(c) silero-vad's own per-stream model (`load_silero_vad()`, called chunk by chunk);
(d) our whole `VADService` path: N asyncio tasks each `await stream.process(512 samples)` per
    tick (futures, the hop to the worker thread, gather and scatter of state included), on
    the audio as is and on the same audio with 1-LSB dither, which has no digital silence
    (so the silence gate never fires).

Figures are CPU microseconds (process time, every thread) per stream per 32 ms chunk; on a
shared machine CPU time is steadier than wall time. Real-time streams per core
= 32 000 / µs. Every case is measured `--repeats` times, interleaved, and the median kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

CHUNK = 512
CHUNK_US = 32_000.0  # one chunk is 32 ms of audio
STREAMS = (1, 8, 64, 256)
SENTENCES = ["turn on the kitchen light", "what is the weather like today",
             "set a timer for ten minutes", "play some music in the living room"]


def load_audio() -> tuple[np.ndarray, str]:
    """About 12 s of 16 kHz mono: spoken sentences with pauses, or a synthetic stand-in."""
    from agent.bench.speech import available, espeak

    if available():
        try:
            pieces = []
            for text in SENTENCES:
                pieces += [espeak(text, trim=False), np.zeros(12000, np.float32)]
            return np.concatenate(pieces).astype(np.float32), "espeak-ng speech"
        except (OSError, subprocess.CalledProcessError, ImportError):
            pass
    rng = np.random.default_rng(0)
    t = np.arange(12 * 16000) / 16000
    envelope = np.sin(2 * np.pi * 0.3 * t) > 0  # bursts and pauses, like turns
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) + rng.normal(0, 0.02, t.size)
    return (voice * envelope).astype(np.float32), "synthetic tones and noise"


def dithered(chunks: np.ndarray) -> np.ndarray:
    """The same audio with ±1 LSB (int16) noise added: nothing is digital silence any more."""
    rng = np.random.default_rng(1)
    return (chunks + rng.integers(-1, 2, chunks.shape) / 32768.0).astype(np.float32)


def silent_fraction(chunks: np.ndarray) -> float:
    """Chunks whose samples and 64-sample context are all zero (what the gate skips)."""
    context = np.vstack([np.zeros((1, CHUNK), np.float32), chunks[:-1]])[:, -64:]
    return float(np.mean(~chunks.any(axis=1) & ~context.any(axis=1)))


def cpu_per_call(fn: Callable[[], object], seconds: float) -> float:
    """CPU seconds per call over at least `seconds` of CPU (and 3 calls), after 2 warm-ups."""
    fn()
    fn()
    calls, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds or calls < 3:
        fn()
        calls += 1
    return elapsed / calls


async def async_cpu_per_call(fn: Callable[[], Awaitable[object]], seconds: float) -> float:
    await fn()
    await fn()
    calls, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds or calls < 3:
        await fn()
        calls += 1
    return elapsed / calls


def case_batched(model: Any, chunks: np.ndarray, b: int, seconds: float) -> Callable[[], float]:
    """(a) µs per stream-chunk of `BatchedSilero.forward` at batch size b."""
    states = [model.new_state() for _ in range(b)]
    offsets = np.arange(b) * 7 % len(chunks)  # each stream at its own place in the audio
    tick = [0]

    def step() -> None:
        model.forward(chunks[(offsets + tick[0]) % len(chunks)], states)
        tick[0] += 1

    return lambda: cpu_per_call(step, seconds) / b * 1e6


def livekit_models(streams: int) -> list[Any]:
    from livekit.plugins.silero import onnx_model

    # `VAD.load()` builds one session (1 intra-op thread, no spinning); `VAD.stream()` wraps
    # it in an OnnxModel per stream; the stream calls the model once per 512-sample window.
    session = onnx_model.new_inference_session(force_cpu=True)
    return [onnx_model.OnnxModel(onnx_session=session, sample_rate=16000) for _ in range(streams)]


def case_livekit(chunks: np.ndarray, streams: int, seconds: float) -> Callable[[], float]:
    """(b) µs per stream-chunk: LiveKit's per-stream OnnxModel, the model call alone."""
    models = livekit_models(streams)
    tick = [0]

    def step() -> None:
        for i, m in enumerate(models):
            m(chunks[(i * 7 + tick[0]) % len(chunks)])
        tick[0] += 1

    return lambda: cpu_per_call(step, seconds) / streams * 1e6


class Pumps:
    """One long-lived task per stream, as sessions run: each waits for its next chunk (all are
    released together, once per tick) and awaits `call(stream, tick)` on it."""

    def __init__(self, streams: int, call: Callable[[int, int], Awaitable[object]]) -> None:
        self.streams, self.call = streams, call
        self.gates: list[asyncio.Future[None]] = []  # gates[t] releases tick t
        self.left = 0
        self.done: asyncio.Future[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def pump(self, i: int) -> None:
        t = 0
        while True:
            await self.gates[t]
            await self.call(i, t)
            self.left -= 1
            if self.left == 0 and self.done is not None:
                self.done.set_result(None)
            t += 1

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.tasks:
            self.gates.append(loop.create_future())
            self.tasks = [asyncio.create_task(self.pump(i)) for i in range(self.streams)]
        self.left, self.done = self.streams, loop.create_future()
        self.gates.append(loop.create_future())
        self.gates[-2].set_result(None)
        await self.done

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def case_livekit_path(chunks: np.ndarray, streams: int, seconds: float) -> Callable[[], Awaitable[float]]:
    """(b') the same, each call through the loop's default executor as LiveKit's VADStream does."""
    models = livekit_models(streams)

    def call(i: int, t: int) -> Awaitable[object]:
        return asyncio.get_running_loop().run_in_executor(None, models[i], chunks[(i * 7 + t) % len(chunks)])

    pumps = Pumps(streams, call)

    async def measure() -> float:
        return await async_cpu_per_call(pumps.tick, seconds) / streams * 1e6

    return measure


def case_silero(chunks: np.ndarray, seconds: float) -> Callable[[], float]:
    """(c) µs per chunk of silero-vad's own stateful model, one stream."""
    import torch
    from silero_vad import load_silero_vad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = load_silero_vad()
    tensors = [torch.from_numpy(c) for c in chunks]
    tick = [0]

    def step() -> None:
        with torch.inference_mode():
            model(tensors[tick[0] % len(tensors)], 16000)
        tick[0] += 1

    return lambda: cpu_per_call(step, seconds) * 1e6


def case_service(service: Any, chunks: np.ndarray, streams: int, seconds: float,
                 batches: list[float]) -> Callable[[], Awaitable[float]]:
    """(d) µs per stream-chunk through `VADService`: N tasks each awaiting `process()`."""
    vads = [service.open_stream() for _ in range(streams)]
    pumps = Pumps(streams, lambda i, t: vads[i].process(chunks[(i * 7 + t) % len(chunks)]))

    async def measure() -> float:
        before = dict(service.stats)
        us = await async_cpu_per_call(pumps.tick, seconds) / streams * 1e6
        after = service.stats
        batches.append((after["chunks"] - before["chunks"]) / max(after["ticks"] - before["ticks"], 1))
        return us

    return measure


async def run_cases(args: argparse.Namespace, chunks: np.ndarray) -> tuple[dict[str, list[float]], dict[str, Any]]:
    from agent.vad import BatchedSilero, VADService

    streams = sorted(set(args.streams) | {256})
    batches = sorted(set(args.batches) | set(streams))
    lk_streams = sorted(set(streams) | {args.livekit_streams})
    quiet = dithered(chunks)
    model = BatchedSilero()
    service = VADService(max_batch=max(streams))
    await service.start()
    mean_batch: dict[int, list[float]] = {n: [] for n in streams}
    cases: dict[str, Callable[[], float | Awaitable[float]]] = {}
    for n in batches:  # grouped by stream count, so the figures compared are measured close in time
        cases[f"bare/{n}"] = case_batched(model, chunks, n, args.seconds)
        if n in lk_streams:
            cases[f"livekit/{n}"] = case_livekit(chunks, n, args.seconds)
        if n in streams:
            cases[f"livekit_path/{n}"] = case_livekit_path(chunks, n, args.seconds)
            cases[f"service/{n}"] = case_service(service, chunks, n, args.seconds, mean_batch[n])
            cases[f"service_dither/{n}"] = case_service(service, quiet, n, args.seconds, [])
    if args.livekit_streams not in batches:
        cases[f"livekit/{args.livekit_streams}"] = case_livekit(chunks, args.livekit_streams, args.seconds)
    cases["silero/1"] = case_silero(chunks, args.seconds)
    results: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(args.repeats):
            for name, case in cases.items():
                got = case()
                results[name].append(float(await got) if asyncio.iscoroutine(got) else float(got))  # type: ignore[arg-type]
    finally:
        await service.close()
    info = {"mean_batch": {n: statistics.median(b) for n, b in mean_batch.items() if b},
            "backend": {n: model.backend(n) for n in batches}}
    return results, info


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench vad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per case; the median is kept")
    parser.add_argument("--batches", type=parse_ints, default=list(STREAMS), help="batch sizes for (a)")
    parser.add_argument("--streams", type=parse_ints, default=list(STREAMS), help="stream counts for (b), (d)")
    parser.add_argument("--livekit-streams", type=int, default=64, help="streams for livekit_us_per_stream_chunk")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # per core: the service runs on one worker thread
    audio, source = load_audio()
    chunks = audio[: audio.size // CHUNK * CHUNK].reshape(-1, CHUNK)
    results, info = asyncio.run(run_cases(args, chunks))
    us = {name: statistics.median(v) for name, v in results.items()}

    def by(prefix: str) -> dict[int, float]:
        return {int(k.split("/")[1]): v for k, v in us.items() if k.startswith(prefix + "/")}

    def ratio(top: str, bottom: str) -> dict[int, float]:
        """Median over rounds of top / bottom measured in the same round: the machine's load
        drifts between rounds, and both sides of a ratio drift together."""
        out = {}
        for k in results:
            if k.startswith(bottom + "/") and (f"{top}/" + k.split("/")[1]) in results:
                n = k.split("/")[1]
                out[int(n)] = statistics.median(t / b for t, b in zip(results[f"{top}/{n}"], results[k], strict=True))
        return out

    bare, livekit, lk_path = by("bare"), by("livekit"), by("livekit_path")
    service, service_dither = by("service"), by("service_dither")
    vs_livekit, vs_livekit_dither = ratio("livekit", "service"), ratio("livekit", "service_dither")
    over_bare = ratio("service", "bare")
    silero, gated = us["silero/1"], silent_fraction(chunks)
    print(f"Silero VAD, 1 thread, {source}, {len(chunks)} chunks of 32 ms ({gated:.0%} digital silence); "
          f"CPU µs per stream per chunk, median of {args.repeats} rounds (ratios: median of per-round ratios)")
    header = {"streams": 8, "(a) bare": 9, "(b) livekit": 12, "(b') +hop": 10, "(d) service": 12, "dithered": 9,
              "svc/bare": 9, "lk/svc": 7, "lk/svc dith": 12}
    print(" ".join(f"{h:>{w}}" for h, w in header.items()))
    for n in sorted(service):
        print(f"{n:8} {bare[n]:9.1f} {livekit[n]:12.1f} {lk_path[n]:10.1f} {service[n]:12.1f} "
              f"{service_dither[n]:9.1f} {over_bare[n]:9.2f} {vs_livekit[n]:7.2f} {vs_livekit_dither[n]:12.2f}")
    print(f"(c) silero-vad per-stream model: {silero:.1f} µs; backends by batch: {info['backend']}; "
          f"service mean batch: {info['mean_batch']}")

    def table(d: dict[int, float], digits: int = 2) -> dict[str, float]:
        return {str(k): round(v, digits) for k, v in sorted(d.items())}

    best = min(bare, key=lambda b: bare[b])
    result = {
        "benchmark": "vad",
        "input": source,
        "threads": 1,
        "measure": "cpu_us_per_stream_chunk",
        "repeats": args.repeats,
        "digital_silence_fraction": round(gated, 3),
        "us_per_stream_chunk": table(bare),
        "realtime_streams_per_core_by_batch": {str(b): round(CHUNK_US / v) for b, v in sorted(bare.items())},
        "best_batch": best,
        "realtime_streams_per_core": round(CHUNK_US / bare[best]),
        "backend_by_batch": {str(k): v for k, v in info["backend"].items()},
        "livekit_us_per_stream_chunk": round(livekit[args.livekit_streams], 2),
        "silero_us_per_stream_chunk": round(silero, 2),
        "service_us_per_stream_chunk": round(service[256], 2),
        "ratio_vs_livekit": round(ratio("livekit", "bare")[256], 2),
        "ratio_vs_silero": round(silero / bare[256], 2),
        "service_ratio_vs_livekit": round(vs_livekit[256], 2),
        "livekit_us_by_streams": table({n: livekit[n] for n in service}),
        "livekit_path_us_by_streams": table(lk_path),
        "service_us_by_streams": table(service),
        "service_ratio_vs_livekit_by_streams": table(vs_livekit),
        "service_over_bare_by_streams": table(over_bare),
        "service_mean_batch_by_streams": table(info["mean_batch"], 1),
        "service_dithered_us_by_streams": table(service_dither),
        "service_dithered_ratio_vs_livekit_by_streams": table(vs_livekit_dither),
        "service_ratio_vs_livekit_path_by_streams": table(ratio("livekit_path", "service")),
    }
    print(f"whole service vs livekit-plugins-silero (model call only): {result['service_ratio_vs_livekit']}x "
          f"less CPU per stream at 256 streams, {result['service_ratio_vs_livekit_by_streams'].get('8')}x at 8")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
