"""WebRTC ingest: how many real-time peers one core of the server holds.

N aiortc peers in a second process (real peers, their Opus encoding not counted) stream
speech in real time over loopback to an in-process server; the server's process CPU time
(event loop, Opus decode, resampling, SRTP, batched VAD thread) over wall time gives the
cost per peer. Side by side: the same audio pushed straight into N sessions in real time,
no transport, so the ratio is what WebRTC itself costs. The model is a ScriptedBackend:
this measures ingest + VAD, not inference.

    voice-agent bench webrtc [--peers 1 4 8] [--seconds 6] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from typing import Any

import numpy as np

FRAME = 320  # 20 ms at 16 kHz, what a browser sends per packet
FRAMES_PER_S = 50


def _client_main(url: str, peers: int, audio: np.ndarray, stop: Any) -> None:
    """The peers' process: connect, stream until `stop` is set, close."""
    asyncio.run(_clients(url, peers, audio, stop))


async def _clients(url: str, peers: int, audio: np.ndarray, stop: Any) -> None:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from agent.bench.track import PacedTrack
    from agent.transports.webrtc import use_loopback_candidates

    use_loopback_candidates()
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)

    pcs = []
    async with aiohttp.ClientSession() as http:
        for i in range(peers):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            # looped speech in real time, peers out of phase like real speakers
            pc.addTrack(PacedTrack(pcm, loop=True, offset=i * 7919 * FRAME, clock_at_first_frame=False))
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/v1/sessions", json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
                answer = await r.json()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            pcs.append(pc)
    while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing.Event (another process sets it)
        await asyncio.sleep(0.1)
    await asyncio.gather(*(pc.close() for pc in pcs))


async def _measure(seconds: float, frames: Any, dropped: Any) -> dict[str, float]:
    cpu0, wall0, f0, d0 = time.process_time(), time.monotonic(), frames(), dropped()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"cpu": cpu, "wall": wall, "frames": frames() - f0, "dropped": dropped() - d0}


async def _run_webrtc(manager: Any, url: str, peers: int, audio: np.ndarray, seconds: float) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_client_main, args=(url, peers, audio, stop), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not (len(manager.peers) == peers and all(p.frames for p in manager.peers.values())):
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError(f"{peers} peers did not connect")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # past connection set-up
        live = list(manager.peers.values())
        return await _measure(seconds, lambda: sum(p.frames for p in live),
                              lambda: sum(p.dropped_frames for p in live))
    finally:
        stop.set()
        await asyncio.to_thread(proc.join, 20)
        if proc.is_alive():
            proc.kill()
        await manager.close_all("bench_done")


async def _run_direct(runtime: Any, peers: int, audio: np.ndarray, seconds: float) -> dict[str, float]:
    """The same real-time audio into sessions with no transport in between."""
    sessions = [runtime.create_session() for _ in range(peers)]
    sent = [0]

    async def feed(i: int, session: Any) -> None:
        pos, t0 = i * 7919 * FRAME, time.monotonic()
        n = 0
        while True:
            wait = t0 + n * FRAME / 16000 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            start = pos % (audio.size - FRAME)
            await session.push_audio(audio[start : start + FRAME])
            pos, n = pos + FRAME, n + 1
            sent[0] += 1

    tasks = [asyncio.create_task(feed(i, s)) for i, s in enumerate(sessions)]
    try:
        await asyncio.sleep(0.5)
        return await _measure(seconds, lambda: sent[0], lambda: 0)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions:
            await s.close("bench_done")


async def _bench(peer_counts: list[int], seconds: float) -> dict[str, Any]:
    from aiohttp import web

    from agent.bench.vad import load_audio
    from agent.config import load_settings
    from agent.inference.scripted import ScriptedBackend
    from agent.runtime import AgentRuntime
    from agent.server.app import MANAGER, create_app
    from agent.transports.webrtc import use_loopback_candidates

    use_loopback_candidates()
    audio, source = load_audio()
    settings = load_settings(None, model="tiny-random")
    settings.server.max_sessions = max(peer_counts) + 1
    runtime = AgentRuntime(settings, backend=ScriptedBackend([], default="ok"))
    await runtime.start()
    app = create_app(runtime, settings)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    runs = []
    try:
        for n in peer_counts:
            for path in ("webrtc", "direct"):
                if path == "webrtc":
                    m = await _run_webrtc(app[MANAGER], url, n, audio, seconds)
                else:
                    m = await _run_direct(runtime, n, audio, seconds)
                cores = m["cpu"] / m["wall"]
                expected = FRAMES_PER_S * n * m["wall"]
                runs.append({"peers": n, "path": path, "cpu_cores": round(cores, 4),
                             "cpu_per_peer": round(cores / n, 5), "frames": int(m["frames"]),
                             "frames_expected": int(expected), "dropped": int(m["dropped"]),
                             # real time held: every frame arrived (5 % slack for edges) and none dropped
                             "real_time": m["dropped"] == 0 and m["frames"] >= 0.95 * expected})
    finally:
        await runner.cleanup()
        await runtime.close()
    return {"source": source, "seconds": seconds, "runs": runs}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    web_ok = [r for r in result["runs"] if r["path"] == "webrtc" and r["real_time"]]
    best = max(web_ok, key=lambda r: r["peers"]) if web_ok else None
    result["peers_per_core"] = round(1 / best["cpu_per_peer"], 1) if best and best["cpu_per_peer"] else 0.0
    result["measured_at_peers"] = best["peers"] if best else None
    by = {(r["peers"], r["path"]): r for r in result["runs"]}
    if best and (best["peers"], "direct") in by and by[(best["peers"], "direct")]["cpu_per_peer"]:
        result["webrtc_vs_direct_cpu"] = round(best["cpu_per_peer"] / by[(best["peers"], "direct")]["cpu_per_peer"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench webrtc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 4, 8], help="peer counts to run")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.peers) or args.seconds <= 0:
        parser.error("--peers must be ≥ 1 and --seconds > 0")
    result = summarise(asyncio.run(_bench(sorted(set(args.peers)), args.seconds)))
    print(f"WebRTC ingest + batched VAD, {result['source']}, {args.seconds:g} s per run, server process CPU")
    print(f"{'peers':>5} {'path':>7} {'cores':>7} {'% core/peer':>12} {'frames rx':>10} {'dropped':>8} {'real time':>10}")
    for r in result["runs"]:
        print(f"{r['peers']:5d} {r['path']:>7} {r['cpu_cores']:7.3f} {100 * r['cpu_per_peer']:12.2f} "
              f"{r['frames']:10d} {r['dropped']:8d} {'yes' if r['real_time'] else 'NO':>10}")
    print(f"peers one core holds (WebRTC, no dropped audio, at {result['measured_at_peers']} peers): "
          f"{result['peers_per_core']}")
    if "webrtc_vs_direct_cpu" in result:
        print(f"WebRTC transport costs {result['webrtc_vs_direct_cpu']}x the CPU of pushing the audio directly")
    if args.json:
        print(json.dumps(result))
    return 0 if result["peers_per_core"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
