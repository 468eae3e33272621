"""`voice-agent bench vad`: cost of voice-activity detection per stream, side by side.

(a) our BatchedSilero at several batch sizes, (b) livekit-plugins-silero's model as LiveKit
runs it (an OnnxModel per stream, one call per stream per 32 ms chunk), (c) silero-vad's own
per-stream model. All on one torch / onnxruntime thread, on the same real speech.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

CHUNK_MS = 32.0


def _speech(seconds: float) -> np.ndarray:
    """Real-ish input: a deterministic mix of tones and noise bursts (no files needed)."""
    rng = np.random.default_rng(0)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    envelope = (np.sin(2 * np.pi * 0.7 * t) > 0).astype(np.float32)
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) + rng.normal(0, 0.02, n)
    return (voice * envelope).astype(np.float32)


def _time(fn, min_seconds: float) -> float:
    """Seconds per call, repeated for at least `min_seconds` after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 3:
        fn()
        calls += 1
    return elapsed / calls


def bench_batched(audio: np.ndarray, batch: int, seconds: float) -> float:
    from agent.vad import CHUNK, BatchedSilero

    model = BatchedSilero()
    states = [model.new_state() for _ in range(batch)]
    chunks = audio[: (audio.size // CHUNK) * CHUNK].reshape(-1, CHUNK)
    pos = [0]

    def tick() -> None:
        i = pos[0] % len(chunks)
        pos[0] += 1
        model.forward(np.repeat(chunks[i : i + 1], batch, axis=0), states)

    return _time(tick, seconds) / batch * 1e6


def bench_livekit(audio: np.ndarray, streams: int, seconds: float) -> float:
    from livekit.plugins.silero import onnx_model

    session = onnx_model.new_inference_session(force_cpu=True)
    models = [onnx_model.OnnxModel(onnx_session=session, sample_rate=16000) for _ in range(streams)]
    chunks = audio[: (audio.size // 512) * 512].reshape(-1, 512)
    pos = [0]

    def tick() -> None:
        chunk = chunks[pos[0] % len(chunks)]
        pos[0] += 1
        for m in models:  # LiveKit: every stream runs its own inference per chunk
            m(chunk)

    return _time(tick, seconds) / streams * 1e6


def bench_silero(audio: np.ndarray, seconds: float) -> float:
    import torch
    from silero_vad import load_silero_vad

    model = load_silero_vad()
    chunks = [torch.from_numpy(c) for c in audio[: (audio.size // 512) * 512].reshape(-1, 512)]
    pos = [0]

    def tick() -> None:
        with torch.inference_mode():
            model(chunks[pos[0] % len(chunks)], 16000)
        pos[0] += 1

    return _time(tick, seconds) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench vad")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per case")
    parser.add_argument("--batches", default="1,8,64,256")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    audio = _speech(10.0)
    batches = [int(b) for b in args.batches.split(",")]
    ours = {b: bench_batched(audio, b, args.seconds) for b in batches}
    livekit = bench_livekit(audio, 8, args.seconds)
    silero = bench_silero(audio, args.seconds)

    def per_core(us: float) -> float:
        return CHUNK_MS * 1000 / us

    rows = [(f"ours, batched B={b}", us) for b, us in ours.items()]
    rows += [("livekit-plugins-silero (ONNX per stream)", livekit), ("silero-vad per-stream model", silero)]
    print(f"{'VAD, 1 thread':44} {'µs/stream/chunk':>16} {'real-time streams/core':>24}")
    for name, us in rows:
        print(f"{name:44} {us:16.1f} {per_core(us):24.0f}")
    best = min(ours.values())
    ref = ours.get(256, best)
    result = {
        "benchmark": "vad",
        "us_per_stream_chunk": {str(b): round(us, 2) for b, us in ours.items()},
        "livekit_us_per_stream_chunk": round(livekit, 2),
        "silero_us_per_stream_chunk": round(silero, 2),
        "realtime_streams_per_core": round(per_core(best)),
        "ratio_vs_livekit": round(livekit / ref, 2),
        "ratio_vs_silero": round(silero / ref, 2),
    }
    print(f"ratio vs livekit: {result['ratio_vs_livekit']}x, vs silero-vad: {result['ratio_vs_silero']}x")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
