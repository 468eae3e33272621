"""LiveKit room transport: what it costs per participant, side by side with no transport.

No LiveKit server runs here, so this measures the part we own plus the SDK's local half.
Per participant, in real time: 10 ms frames of 48 kHz speech (espeak-ng, looped) →
`rtc.AudioSource.capture_frame` → local audio track → `rtc.AudioStream` (16 kHz mono, the
SDK's native resampler) → our `AudioPump` → `Session.push_audio` with the real shared VAD
service and turn detector; a ScriptedBackend answers "ok", so no model runs, and the
router's events go to a discarding outbound. Side by side ("direct"): the same audio,
already 16 kHz, pushed straight into sessions at the same pace. "senders" runs only the
capture side (sources and tracks, nobody listening): that part is a remote client's work in
production, so livekit − senders approximates what the server pays for the room transport.
CPU is getrusage(RUSAGE_SELF) — every thread, the SDK's native ones included — over wall time.
The SDK (1.1.x) hands every FFI audio event to every AudioStream in the process (and, while
it waits, to every capture_frame), each filtering in Python: the cost per participant of both
livekit paths grows with the participant count, which the direct path's does not.

    voice-agent bench livekit [--participants 1,4,16] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

FRAME_S = 0.01  # 10 ms frames, as a LiveKit client captures them
IN_RATE, IN_FRAME = 48000, 480
RATE, FRAME = 16000, 160
LEAD_S = 0.03  # the senders start this far ahead, like a client's small jitter buffer
WARMUP_S = 1.0
PATHS = ("livekit", "senders", "direct")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of the process
    return usage.ru_utime + usage.ru_stime


class _Discard:
    """The room's outbound side (LocalParticipant's signatures): everything is dropped."""

    async def publish_data(self, payload: bytes | str, **_: Any) -> None: ...

    async def stream_text(self, **_: Any) -> _Discard:
        return self

    async def send_text(self, text: str, **_: Any) -> None: ...

    async def write(self, text: str) -> None: ...

    async def aclose(self, **_: Any) -> None: ...


async def _paced(n: int, send: Callable[[int, int], Awaitable[None]], lag: list[float]) -> None:
    """Participant `n` sends frame k at t0 + k·10 ms; `lag` keeps the worst lateness seen."""
    t0, k = time.monotonic() - LEAD_S, 0
    while True:
        late = time.monotonic() - (t0 + k * FRAME_S)
        if late < 0:
            await asyncio.sleep(-late)
        elif late > lag[0]:
            lag[0] = late
        await send(n, k)
        k += 1


async def _run(path: str, n: int, runtime: Any, audio: np.ndarray, seconds: float) -> dict[str, Any]:
    from livekit import rtc

    from agent.transports.livekit.participant import ParticipantRouter

    offsets = [i * 7919 for i in range(n)]  # out of phase, like real speakers
    router, sources, sessions = None, [], []
    if path == "direct":
        chunks = audio[: audio.size // FRAME * FRAME].reshape(-1, FRAME)
        sessions = [runtime.create_session() for _ in range(n)]

        async def send(i: int, k: int) -> None:
            await sessions[i].push_audio(chunks[(offsets[i] + k) % len(chunks)])
    else:
        # 48 kHz as a client captures it (the speech itself is 16 kHz, linearly upsampled)
        up = np.interp(np.arange(audio.size * 3) / 3, np.arange(audio.size), audio)
        pcm = (np.clip(up, -1, 1) * 32767).astype(np.int16)
        frames = [rtc.AudioFrame(pcm[s : s + IN_FRAME].tobytes(), IN_RATE, 1, IN_FRAME)
                  for s in range(0, pcm.size - IN_FRAME + 1, IN_FRAME)]
        sources = [rtc.AudioSource(IN_RATE, 1) for _ in range(n)]
        tracks = [rtc.LocalAudioTrack.create_audio_track(f"mic-{i}", s) for i, s in enumerate(sources)]
        if path == "livekit":
            router = ParticipantRouter(runtime, runtime.bus)
            router.outbound = _Discard()
            for i, track in enumerate(tracks):
                router.on_track_subscribed(track, f"participant-{i}")

        async def send(i: int, k: int) -> None:
            await sources[i].capture_frame(frames[(offsets[i] + k) % len(frames)])

    pumps = [p.pump for p in router.participants.values() if p.pump] if router else []
    sent = [0]

    async def counted(i: int, k: int) -> None:
        await send(i, k)
        sent[0] += 1

    def received() -> tuple[float, int]:  # (seconds of audio that reached sessions, dropped frames)
        if pumps:
            return sum(p.samples for p in pumps) / RATE, sum(p.dropped_frames for p in pumps)
        return sent[0] * FRAME_S, 0

    lag = [0.0]
    tasks = [asyncio.create_task(_paced(i, counted, lag)) for i in range(n)]
    try:
        await asyncio.sleep(WARMUP_S)
        lag[0] = 0.0
        (a0, d0), cpu0, wall0 = received(), cpu_seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall, (a1, d1) = cpu_seconds() - cpu0, time.monotonic() - wall0, received()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if router is not None:
            await router.aclose("bench_done")
        for source in sources:
            await source.aclose()
        for session in sessions:
            await session.close("bench_done")
    cores = cpu / wall
    return {"participants": n, "path": path, "cpu_cores": round(cores, 4),
            "cpu_per_participant": round(cores / n, 5), "audio_s": round(a1 - a0, 2),
            "audio_expected_s": round(n * wall, 2), "dropped_frames": d1 - d0,
            "max_lag_ms": round(lag[0] * 1000, 1),
            # real time held: the audio arrived (5 % slack for edges), none dropped, senders on time
            "real_time": d1 == d0 and a1 - a0 >= 0.95 * n * wall and lag[0] < 0.2}


async def _bench(counts: list[int], seconds: float) -> dict[str, Any]:
    from agent.bench.vad import load_audio
    from agent.config import load_settings
    from agent.inference.scripted import ScriptedBackend
    from agent.runtime import AgentRuntime

    audio, source = load_audio()
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=ScriptedBackend([], default="ok"))
    await runtime.start()
    try:
        runs = [await _run(path, n, runtime, audio, seconds) for n in counts for path in PATHS]
    finally:
        await runtime.close()
    return {"benchmark": "livekit", "input": source, "seconds": seconds, "runs": runs}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    by = {(r["participants"], r["path"]): r for r in result["runs"]}
    counts = sorted({r["participants"] for r in result["runs"]})
    ok = [n for n in counts if by[(n, "livekit")]["real_time"]]
    at = max(ok) if ok else max(counts)
    lk, direct, senders = by[(at, "livekit")], by[(at, "direct")], by[(at, "senders")]
    ratio = {n: round(by[(n, "livekit")]["cpu_cores"] / max(by[(n, "direct")]["cpu_cores"], 1e-9), 2) for n in counts}
    receive = max(lk["cpu_per_participant"] - senders["cpu_per_participant"], 1e-9)
    result |= {
        "measured_at_participants": at,
        "cpu_per_participant": {str(n): by[(n, "livekit")]["cpu_per_participant"] for n in counts},
        "direct_cpu_per_participant": {str(n): by[(n, "direct")]["cpu_per_participant"] for n in counts},
        "overhead_ratio": ratio[at],
        "overhead_ratio_by_participants": {str(n): r for n, r in ratio.items()},
        "participants_per_core": round(1 / lk["cpu_per_participant"], 1) if ok and lk["cpu_per_participant"] else 0.0,
        "participants_per_core_server_side": round(1 / receive, 1) if ok else 0.0,
        "direct_participants_per_core": round(1 / max(direct["cpu_per_participant"], 1e-9), 1),
        "dropped_frames": sum(by[(n, "livekit")]["dropped_frames"] for n in counts),
        "real_time": len(ok) == len(counts),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench livekit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", default="1,4,16", help="participant counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wall seconds per run (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(c) for c in args.participants.split(",")})
    except ValueError:
        parser.error("--participants takes comma-separated integers")
    if counts[0] < 1 or args.seconds <= 0:
        parser.error("--participants must be ≥ 1 and --seconds > 0")
    result = summarise(asyncio.run(_bench(counts, args.seconds)))
    print(f"LiveKit room transport vs direct push, {result['input']}, {args.seconds:g} s per run, process CPU")
    print(f"{'partic.':>7} {'path':>8} {'cores':>7} {'% core/partic.':>15} {'audio s':>8} {'expected':>9} "
          f"{'dropped':>8} {'max lag ms':>11} {'real time':>10}")
    for r in result["runs"]:
        print(f"{r['participants']:7d} {r['path']:>8} {r['cpu_cores']:7.3f} {100 * r['cpu_per_participant']:15.2f} "
              f"{r['audio_s']:8.1f} {r['audio_expected_s']:9.1f} {r['dropped_frames']:8d} {r['max_lag_ms']:11.1f} "
              f"{'yes' if r['real_time'] else 'NO':>10}")
    ratios = ", ".join(f"{n}: {r}x" for n, r in result["overhead_ratio_by_participants"].items())
    print(f"livekit path CPU / direct push CPU, by participants: {ratios}")
    print(f"real-time participants one core holds on the livekit path (at {result['measured_at_participants']}): "
          f"{result['participants_per_core']} (server side only, senders' capture subtracted: "
          f"{result['participants_per_core_server_side']}; direct push: {result['direct_participants_per_core']})")
    if args.json:
        print(json.dumps(result))
    return 0 if result["participants_per_core"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
