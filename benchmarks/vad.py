"""`voice-agent bench vad`: cost of voice-activity detection per stream, side by side.

All in one run, on one torch / onnxruntime thread, on the same 16 kHz audio (espeak-ng
speech when espeak-ng is installed, else a labelled synthetic signal):

(a) our `BatchedSilero`, one forward per tick over B streams, B = 1, 8, 64, 256;
(b) livekit-plugins-silero as its `VADStream` runs it: the ONNX session `VAD.load()` makes,
    one `OnnxModel` (own state and context) per stream, one call per stream per chunk;
(c) silero-vad's own per-stream model (`load_silero_vad()`, called chunk by chunk);
(d) our whole `VADService` path: 256 streams each `await process(512 samples)` per tick
    (asyncio futures and the hop to the worker thread included).

Figures are microseconds per stream per 32 ms chunk; real-time streams per core
= 32 000 / µs. (b) and (c) are timed on the model call alone: LiveKit's per-chunk
`run_in_executor` hop and int16 conversion are left out, which favours them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

CHUNK = 512
CHUNK_US = 32_000.0  # one chunk is 32 ms of audio
SENTENCES = ["turn on the kitchen light", "what is the weather like today",
             "set a timer for ten minutes", "play some music in the living room"]


def load_audio() -> tuple[np.ndarray, str]:
    """About 12 s of 16 kHz mono: spoken sentences with pauses, or a synthetic stand-in."""
    if shutil.which("espeak-ng"):
        try:
            from agent.audio import read_file

            with tempfile.TemporaryDirectory() as tmp:
                pieces = []
                for i, text in enumerate(SENTENCES):
                    wav = Path(tmp) / f"{i}.wav"
                    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text],
                                   check=True, capture_output=True)
                    pieces += [read_file(wav), np.zeros(12000, np.float32)]
            return np.concatenate(pieces).astype(np.float32), "espeak-ng speech"
        except (OSError, subprocess.CalledProcessError, ImportError):
            pass
    rng = np.random.default_rng(0)
    t = np.arange(12 * 16000) / 16000
    envelope = np.sin(2 * np.pi * 0.3 * t) > 0  # bursts and pauses, like turns
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) + rng.normal(0, 0.02, t.size)
    return (voice * envelope).astype(np.float32), "synthetic tones and noise"


def per_call_seconds(fn: Callable[[], object], min_seconds: float) -> float:
    """Mean seconds per call over at least `min_seconds` (and 3 calls), after 2 warm-ups."""
    fn()
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 3:
        fn()
        calls += 1
    return elapsed / calls


def bench_batched(chunks: np.ndarray, batches: list[int], seconds: float) -> dict[int, float]:
    """(a) µs per stream-chunk of `BatchedSilero.forward` at each batch size."""
    from agent.vad import BatchedSilero

    model = BatchedSilero()
    out = {}
    for b in batches:
        states = [model.new_state() for _ in range(b)]
        offsets = np.arange(b) * 7 % len(chunks)  # each stream at its own place in the audio
        tick = [0]

        def step() -> None:
            model.forward(chunks[(offsets + tick[0]) % len(chunks)], states)
            tick[0] += 1

        out[b] = per_call_seconds(step, seconds) / b * 1e6
    return out


def bench_livekit(chunks: np.ndarray, streams: int, seconds: float) -> float:
    """(b) µs per stream-chunk: LiveKit's per-stream OnnxModel, as its VADStream calls it."""
    from livekit.plugins.silero import onnx_model

    # `VAD.load()` builds one session (1 intra-op thread, no spinning); `VAD.stream()` wraps
    # it in an OnnxModel per stream; the stream calls the model once per 512-sample window.
    session = onnx_model.new_inference_session(force_cpu=True)
    models = [onnx_model.OnnxModel(onnx_session=session, sample_rate=16000) for _ in range(streams)]
    tick = [0]

    def step() -> None:
        for i, m in enumerate(models):
            m(chunks[(i * 7 + tick[0]) % len(chunks)])
        tick[0] += 1

    return per_call_seconds(step, seconds) / streams * 1e6


def bench_silero(chunks: np.ndarray, seconds: float) -> float:
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

    return per_call_seconds(step, seconds) * 1e6


async def _bench_service(chunks: np.ndarray, streams: int, seconds: float) -> tuple[float, float]:
    from agent.vad import VADService

    service = VADService(max_batch=streams)
    await service.start()
    try:
        vads = [service.open_stream() for _ in range(streams)]
        tick = 0

        async def step() -> None:
            nonlocal tick
            await asyncio.gather(*(v.process(chunks[(i * 7 + tick) % len(chunks)]) for i, v in enumerate(vads)))
            tick += 1

        await step()
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
            await step()
            calls += 1
        return elapsed / calls / streams * 1e6, service.stats["mean_batch_size"]
    finally:
        await service.close()


def bench_service(chunks: np.ndarray, streams: int, seconds: float) -> tuple[float, float]:
    """(d) µs per stream-chunk through VADService (and the mean batch it formed)."""
    return asyncio.run(_bench_service(chunks, streams, seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench vad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per case (default 2)")
    parser.add_argument("--batches", default="1,8,64,256", help="batch sizes for (a), comma-separated")
    parser.add_argument("--livekit-streams", type=int, default=64, help="streams for (b)")
    args = parser.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")} | {256})  # ratio is taken at B=256

    import torch

    torch.set_num_threads(1)  # per core: the service runs on one worker thread
    audio, source = load_audio()
    chunks = audio[: audio.size // CHUNK * CHUNK].reshape(-1, CHUNK)

    ours = bench_batched(chunks, batches, args.seconds)
    livekit = bench_livekit(chunks, args.livekit_streams, args.seconds)
    silero = bench_silero(chunks, args.seconds)
    service, service_batch = bench_service(chunks, 256, args.seconds)

    rows = [(f"(a) ours, BatchedSilero B={b}", us) for b, us in ours.items()]
    rows += [(f"(b) livekit-plugins-silero, ONNX per stream ({args.livekit_streams} streams)", livekit),
             ("(c) silero-vad per-stream model", silero),
             (f"(d) ours, VADService 256 streams (mean batch {service_batch:.0f})", service)]
    print(f"Silero VAD, 1 thread, {source}, {len(chunks)} chunks of 32 ms")
    print(f"{'':62} {'µs/stream/chunk':>16} {'real-time streams/core':>23}")
    for name, us in rows:
        print(f"{name:62} {us:16.1f} {CHUNK_US / us:23.0f}")
    best = min(ours, key=lambda b: ours[b])
    result = {
        "benchmark": "vad",
        "input": source,
        "threads": 1,
        "us_per_stream_chunk": {str(b): round(us, 2) for b, us in ours.items()},
        "realtime_streams_per_core_by_batch": {str(b): round(CHUNK_US / us) for b, us in ours.items()},
        "best_batch": best,
        "realtime_streams_per_core": round(CHUNK_US / ours[best]),
        "livekit_us_per_stream_chunk": round(livekit, 2),
        "silero_us_per_stream_chunk": round(silero, 2),
        "service_us_per_stream_chunk": round(service, 2),
        "ratio_vs_livekit": round(livekit / ours[256], 2),
        "ratio_vs_silero": round(silero / ours[256], 2),
        "service_ratio_vs_livekit": round(livekit / service, 2),
    }
    print(f"ours at B=256 vs livekit-plugins-silero: {result['ratio_vs_livekit']}x less CPU per stream; "
          f"vs silero-vad: {result['ratio_vs_silero']}x; whole service vs livekit: "
          f"{result['service_ratio_vs_livekit']}x")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
