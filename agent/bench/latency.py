"""Voice to voice: the end of the user's speech → the first audible frame of the answer.

Real aiortc peers (spread over a few client processes) call a real `voice-agent serve`
subprocess (`--processes 1,2`). Each peer speaks espeak-ng utterances paced in real time, with
pauses between them long enough for the answer, from a track that stamps the time it hands
over each frame, so the moment the last speech sample of each utterance left is known. The
latency of a turn is the first received frame louder than `AUDIBLE_RMS` after that moment
that starts a stretch of the agent's voice (not the tail of an earlier answer still arriving).
One utterance in each peer's list hesitates ("set a timer for, um," … "ten minutes"): a
commit inside it is a premature cut-off (counted from `turn.committed` against the known
bounds; such an utterance counts as cut, not in the latency figures, whose `turns` are the
utterances left whole). Answers are scripted, paced like a 7B on a GPU (`--token-ms` per 4-character chunk,
≈ one token) or come from `--backend tiny-random`; speech out is espeak.

Every hop of a turn is stamped on this host's monotonic clock (peers and server share it):
the peer handing over its last speech frame → the server's VAD processing the last speech chunk
(network, the server's receive jitter buffer, resampling, the VAD's tick) → silence detected →
the commit (the decision) → first token → first clause to the TTS → its first audio → the first
frame out → the first audible frame at the peer (network, the peer's jitter buffer, the voice's
fade-in). `hops` gives each hop's p50/p95 at the headline point; they add up to voice to voice.
The test peers hold received audio for `--peer-jitter-frames` frames (aiortc's default is 4; a
browser's adaptive buffer sits at ~40–80 ms on a LAN).

A baseline runs in the same invocation with today's turn-taking (`turns.min_silence_s=0.5`,
and `turns.end_of_turn=silence`, `turns.preemptive=false` where the settings have them).
The server's CPU (every process of it) and the peers' own CPU are reported per peer.

    voice-agent bench latency [--processes 1,2] [--peers 1,4,8,16] [--token-ms 25] [--json]

Exit status 1 when a target fails (issues 18 and 23): v2v p95 ≤ 0.8 s and p50 ≤ 0.6 s at 4
peers, p50 ≥ 1.4× faster than the baseline, no more premature cut-offs than the baseline, and
2 frontends serving ≥ 1.6× the peers 1 frontend serves within p95 ≤ 0.8 s.

JSON: `by_processes[N].peers_within_p95` is the most peers N frontends serve with every turn
answered and v2v p95 ≤ 0.8 s. `peers_held`, its name before, is still written with the same
value and is deprecated: read `peers_within_p95`.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.procs import stop_process
from agent.bench.speech import espeak

RATE = 16000
FRAME = 320  # 20 ms, what a browser sends per packet
AUDIBLE_RMS = 500.0  # int16 RMS: well above Opus noise on silence, well below espeak's speech
ONSET_GAP_S = 0.25  # an answer starts at an audible frame after this long without one (not a late tail)
ANSWER = "Sure thing, the kitchen light is on now."
UTTERANCES: list[list[str | float]] = [  # text, or seconds of a pause inside the utterance
    ["turn on the kitchen light"],
    ["what is the weather like today"],
    ["set a timer for, um,", 0.7, "ten minutes"],
    ["play some music in the living room"],
]
GAP_S = 5.0  # after each utterance: the silence window, the answer and its speech fit in it
TARGET_P95_S = 0.8
TARGET_P50_S, TARGET_SPEEDUP, TARGET_PROCESS_GAIN = 0.6, 1.4, 1.6


# ---- the peers' speech --------------------------------------------------------------------
@dataclass
class Script:
    """One peer's microphone: samples and the (start, end) sample of each utterance."""

    samples: np.ndarray
    utterances: list[tuple[int, int]]


def build_script(index: int, count: int, clips: dict[str, np.ndarray], lead_s: float) -> Script:
    order = UTTERANCES[index % len(UTTERANCES):] + UTTERANCES[: index % len(UTTERANCES)]
    pieces = [np.zeros(int(lead_s * RATE), np.float32)]
    bounds, pos = [], pieces[0].size
    for utterance in order[:count]:
        start = pos
        for part in utterance:
            piece = clips[part] if isinstance(part, str) else np.zeros(int(part * RATE), np.float32)
            pieces.append(piece)
            pos += piece.size
        bounds.append((start, pos))
        gap = np.zeros(int(GAP_S * RATE), np.float32)
        pieces.append(gap)
        pos += gap.size
    return Script(np.concatenate(pieces), bounds)


# ---- one client process -------------------------------------------------------------------
def _client_main(url: str, scripts: list[Script], out: Any, jitter_frames: int = 4) -> None:
    import aiortc  # noqa: F401 - imported before the clock starts: the peers' CPU is what they spend

    cpu0 = time.process_time()
    try:
        results = asyncio.run(_clients(url, scripts, jitter_frames))
    except BaseException as exc:  # the parent reports it rather than waiting out its timeout
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    out.put({"peers": results, "cpu_s": time.process_time() - cpu0})


async def _clients(url: str, scripts: list[Script], jitter_frames: int = 4) -> list[dict[str, Any]]:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from agent.bench.track import PacedTrack
    from agent.transports.webrtc import set_receive_jitter, use_loopback_candidates

    use_loopback_candidates()

    async def peer(script: Script, http: aiohttp.ClientSession) -> dict[str, Any]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        mic = PacedTrack(script.samples)  # real-time speech, stamps when each frame is handed over
        channel = pc.createDataChannel("events")
        events: list[dict[str, Any]] = []
        onsets: list[float] = []  # when each stretch of the agent's voice began to arrive
        channel.on("message", lambda m: events.append(json.loads(m)))

        async def listen(track: Any) -> None:
            last = -1.0
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                pcm = frame.to_ndarray().astype(np.float32)
                if float(np.sqrt(np.mean(pcm * pcm))) > AUDIBLE_RMS:
                    now = time.monotonic()
                    if now - last > ONSET_GAP_S:
                        onsets.append(now)
                    last = now

        listeners: list[asyncio.Task[None]] = []
        pc.on("track", lambda track: listeners.append(asyncio.ensure_future(listen(track))))
        pc.addTrack(mic)
        await pc.setLocalDescription(await pc.createOffer())
        async with http.post(f"{url}/v1/sessions", json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"POST /v1/sessions: {r.status} {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        set_receive_jitter(pc, jitter_frames)
        end = script.samples.size / RATE + 1.0
        await asyncio.wait_for(mic.first_frame.wait(), 60)  # connected: the first frame went out
        await asyncio.sleep((mic.t0 or 0.0) + end - time.monotonic())
        await pc.close()
        for task in listeners:
            task.cancel()
        turns = []
        for start, stop in script.utterances:
            last = (stop - 1) // FRAME  # the frame that carries the last speech sample
            sent = mic.sent[last] if last < len(mic.sent) else None
            heard = next((t for t in onsets if sent is not None and t > sent), None)
            v2v = None if heard is None or sent is None or heard - sent > GAP_S else heard - sent
            turns.append({"start_s": start / RATE, "end_s": stop / RATE, "v2v_s": v2v,
                          "hops": None if v2v is None or sent is None or heard is None else _hops(sent, heard, events)})
        return {"session_id": answer.get("session_id", ""), "turns": turns,
                "committed": [e for e in events if e["type"] == "turn.committed"],
                # response.done: from the commit; response.audio.started: every stage from the end of speech
                "timings": [e.get("timings", {}) for e in events
                            if e["type"] in ("response.done", "response.audio.started")]}

    async with aiohttp.ClientSession() as http:
        return await asyncio.gather(*(peer(s, http) for s in scripts))


# ---- the server ---------------------------------------------------------------------------
class Server:
    """`voice-agent serve` as a subprocess; its CPU is summed over every process it started."""

    def __init__(self, processes: int, backend: str, token_ms: float, tts: str, env: dict[str, str],
                 workdir: Path, max_sessions: int) -> None:
        args = [sys.executable, "-m", "agent.cli", "serve", "--port", "0", "--processes", str(processes),
                "--tts", tts]
        if backend == "scripted":
            script = workdir / "answers.yaml"
            script.write_text(json.dumps({"turns": [ANSWER], "default": ANSWER, "chunk": 4,
                                          "delay_s": token_ms / 1000}))
            args += ["--backend", "scripted", "--script", str(script)]
        else:  # a real model's answers, kept short: it speaks them between the peer's utterances
            args += ["--model", backend, "--max-new-tokens", "12"]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={
            **os.environ, "OMP_NUM_THREADS": "1", "VOICE_AGENT_SERVER__MAX_SESSIONS": str(max_sessions), **env})
        self.url = ""

    def wait_ready(self) -> None:
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if m := re.search(r"serving on (http://\S+?)/ ", line):
                self.url = m.group(1)
                import threading  # keep draining its log, so it never blocks on a full pipe

                threading.Thread(target=lambda: [None for _ in self.proc.stderr or ()], daemon=True).start()
                return
        raise RuntimeError(f"serve exited: {''.join(lines[-20:])}")

    def cpu_s(self) -> float:
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def stop(self) -> None:
        stop_process(self.proc)


def run_point(server: Server, peers: int, scripts: list[Script], client_procs: int, jitter_frames: int = 4) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    groups = [scripts[i::client_procs] for i in range(min(client_procs, peers))]
    procs = [ctx.Process(target=_client_main, args=(server.url, g, out, jitter_frames), daemon=True) for g in groups]
    cpu0, wall0 = server.cpu_s(), time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    if errors := [r["error"] for r in results if "error" in r]:
        raise RuntimeError(f"the peers failed: {errors[0]}")
    wall, server_cpu = time.monotonic() - wall0, server.cpu_s() - cpu0
    for p in procs:
        p.join(10)
    peer_results = [r for res in results for r in res["peers"]]
    cut = [_cut(r, t) for r in peer_results for t in r["turns"]]
    whole = [t for r in peer_results for t in r["turns"] if not _cut(r, t)]
    # What a cut-off turn's user hears first is the answer to half a sentence: not a latency.
    v2v = sorted(t["v2v_s"] for t in whole if t["v2v_s"] is not None)
    turns, premature = len(whole), sum(cut)
    stages: dict[str, list[float]] = {}
    for r in peer_results:
        for timing in r["timings"]:
            for key, value in timing.items():
                if isinstance(value, (int, float)) and key != "speech_end_at":
                    stages.setdefault(key, []).append(float(value))
    return {"peers": peers, "turns": turns, "answered": len(v2v), **_percentiles(v2v),
            "premature_cutoffs": premature, "hops": hop_table([[t for t in r["turns"] if not _cut(r, t)] for r in peer_results]),
            "stages": {k: round(statistics.median(v), 4) for k, v in sorted(stages.items())},
            "server_cpu_cores": round(server_cpu / wall, 3), "server_cpu_per_peer": round(server_cpu / wall / peers, 4),
            "client_cpu_cores": round(sum(r["cpu_s"] for r in results) / wall, 3),
            "client_cpu_per_peer": round(sum(r["cpu_s"] for r in results) / wall / peers, 4)}


HOPS = [("send_to_vad", "speech_end"), ("silence_detected", "end_detected"), ("decision", "commit"),
        ("first_token", "first_token"), ("first_clause", "first_clause"), ("tts_first_audio", "first_audio"),
        ("first_frame_out", "first_frame")]


def _hops(sent: float, heard: float, events: list[dict[str, Any]]) -> dict[str, float] | None:
    """One turn's hops (seconds each), from the server's stamps of the answer first heard after
    `sent` (the peer's last speech frame) and `heard` (its first audible frame of the answer)."""
    for e in events:
        t = e.get("timings", {}) if e["type"] == "response.audio.started" else {}
        at = t.get("speech_end_at")
        if at is None or not sent - 0.5 < at < heard:
            continue
        stamps = [sent] + [at + (t.get(f"speech_end_to_{k}", 0.0) if k != "speech_end" else 0.0) for _, k in HOPS]
        stamps.append(heard)
        names = [n for n, _ in HOPS] + ["peer_playout"]
        return {n: round(b - a, 4) for n, a, b in zip(names, stamps[:-1], stamps[1:], strict=True)}
    return None


def hop_table(turns: list[list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Each hop's p50 / p95 over every peer's (whole) turns."""
    hops: list[dict[str, float]] = [t["hops"] for peer in turns for t in peer if t.get("hops")]
    names = [n for n, _ in HOPS] + ["peer_playout"]
    out: dict[str, dict[str, float | None]] = {}
    for n in names:
        v = [h[n] for h in hops]
        out[n] = {"p50": round(float(np.percentile(v, 50)), 3) if v else None,
                  "p95": round(float(np.percentile(v, 95)), 3) if v else None}
    out["turns"] = {"p50": float(len(hops)), "p95": None}
    return out


def _cut(peer: dict[str, Any], turn: dict[str, Any]) -> bool:
    """A commit whose turn ends inside this utterance (session seconds ≈ the peer's sample clock)."""
    return any(turn["start_s"] + 0.2 < float(c.get("end", -1)) < turn["end_s"] - 0.2 for c in peer["committed"])


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"v2v_p50_s": None, "v2v_p95_s": None, "v2v_max_s": None}
    return {"v2v_p50_s": round(float(np.percentile(values, 50)), 3),
            "v2v_p95_s": round(float(np.percentile(values, 95)), 3), "v2v_max_s": round(values[-1], 3)}


def baseline_env() -> dict[str, str]:
    """Today's turn-taking, whatever the defaults are now: keys the settings do not have are left out."""
    from agent.config import TurnSettings

    env = {"VOICE_AGENT_TURNS__MIN_SILENCE_S": "0.5"}
    fields = TurnSettings.model_fields
    if "end_of_turn" in fields:
        env["VOICE_AGENT_TURNS__END_OF_TURN"] = "silence"
    if "preemptive" in fields:
        env["VOICE_AGENT_TURNS__PREEMPTIVE"] = "false"
    return env


# ---- the run ------------------------------------------------------------------------------
def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    cache = Path(os.environ.get("VOICE_AGENT_CACHE", Path.home() / ".cache" / "voice-agent")) / "bench-latency"
    cache.mkdir(parents=True, exist_ok=True)
    clips = {p: espeak(p, speed=160, cache=cache) for u in UTTERANCES for p in u if isinstance(p, str)}
    peer_counts, process_counts = sorted(set(args.peers)), list(dict.fromkeys(args.processes))
    headline_peers = 4 if 4 in peer_counts else peer_counts[-1]
    rng = np.random.default_rng(7)
    scripts = [build_script(i, args.utterances, clips, 0.5 + float(rng.uniform(0, 1.5))) for i in range(max(peer_counts))]
    client_procs = args.client_processes or max(1, min(os.cpu_count() or 1, 4))

    def series(processes: int, env: dict[str, str], counts: list[int]) -> dict[int, dict[str, Any]]:
        server = Server(processes, args.backend, args.token_ms, args.tts, env, workdir, max(peer_counts) + 2)
        try:
            server.wait_ready()
            out = {}
            for n in counts:
                out[n] = run_point(server, n, scripts[:n], min(client_procs, n), args.peer_jitter_frames)
                print(f"  processes {processes} peers {n:3d}: v2v p50 {out[n]['v2v_p50_s']} p95 {out[n]['v2v_p95_s']} "
                      f"max {out[n]['v2v_max_s']} answered {out[n]['answered']}/{out[n]['turns']} "
                      f"server {out[n]['server_cpu_cores']} cores", file=sys.stderr, flush=True)
            return out
        finally:
            server.stop()

    by_processes: dict[str, Any] = {}
    for processes in process_counts:
        points = series(processes, {}, peer_counts)
        within = [n for n, p in points.items() if p["v2v_p95_s"] is not None and p["v2v_p95_s"] <= TARGET_P95_S
                  and p["answered"] == p["turns"]]
        served = max(within, default=0)
        by_processes[str(processes)] = {"peers_within_p95": served, "peers_held": served,  # peers_held: deprecated
                                        "by_peers": {str(n): p for n, p in points.items()}}
    print("  baseline (today's turn-taking):", file=sys.stderr)
    base = series(process_counts[0], baseline_env(), [headline_peers])[headline_peers]
    head = by_processes[str(process_counts[0])]["by_peers"][str(headline_peers)]
    speedup = (round(base["v2v_p50_s"] / head["v2v_p50_s"], 3)
               if base["v2v_p50_s"] and head["v2v_p50_s"] else None)
    return {"backend": args.backend, "token_ms": args.token_ms, "tts": args.tts, "processes": process_counts[0],
            "peers": headline_peers, "v2v_p50_s": head["v2v_p50_s"], "v2v_p95_s": head["v2v_p95_s"],
            "v2v_max_s": head["v2v_max_s"], "answered": head["answered"], "turns": head["turns"],
            "baseline_v2v_p50_s": base["v2v_p50_s"], "baseline_v2v_p95_s": base["v2v_p95_s"],
            "speedup_p50_vs_baseline": speedup, "premature_cutoffs": head["premature_cutoffs"],
            "baseline_premature_cutoffs": base["premature_cutoffs"], "stages": head["stages"],
            "baseline_stages": base["stages"], "hops": head["hops"], "baseline_hops": base["hops"],
            "peer_jitter_frames": args.peer_jitter_frames,
            "server_receive_jitter_frames": os.environ.get("VOICE_AGENT_SERVER__RECEIVE_JITTER_FRAMES", "default"),
            "server_cpu_per_peer": head["server_cpu_per_peer"],
            "client_cpu_per_peer": head["client_cpu_per_peer"], "baseline_env": baseline_env(),
            "by_peers": by_processes[str(process_counts[0])]["by_peers"], "by_processes": by_processes}


def _peers_within_p95(entry: dict[str, Any]) -> int:
    """A `by_processes` entry's figure; results written before the rename have only `peers_held`."""
    return int(entry["peers_within_p95"] if "peers_within_p95" in entry else entry["peers_held"])


def check_targets(result: dict[str, Any]) -> list[str]:
    """The targets that failed, each said in words."""
    failed = []
    if result["peers"] == 4:
        p95, p50 = result["v2v_p95_s"], result["v2v_p50_s"]
        if p95 is None or p95 > TARGET_P95_S or p50 is None or p50 > TARGET_P50_S:
            failed.append(f"v2v at 4 peers: p50 {p50} (≤ {TARGET_P50_S}), p95 {p95} (≤ {TARGET_P95_S})")
    if result["speedup_p50_vs_baseline"] is None or result["speedup_p50_vs_baseline"] < TARGET_SPEEDUP:
        failed.append(f"speedup_p50_vs_baseline {result['speedup_p50_vs_baseline']} (≥ {TARGET_SPEEDUP})")
    if result["premature_cutoffs"] > result["baseline_premature_cutoffs"]:
        failed.append(f"premature cut-offs {result['premature_cutoffs']} > baseline "
                      f"{result['baseline_premature_cutoffs']}")
    served = {int(p): _peers_within_p95(v) for p, v in result["by_processes"].items()}
    if 1 in served and 2 in served and (served[2] == 0 or served[2] < TARGET_PROCESS_GAIN * served[1]):
        failed.append(f"peers served within p95 ≤ {TARGET_P95_S} s: {served[2]} with 2 frontends, {served[1]} "
                      f"with 1 (≥ {TARGET_PROCESS_GAIN}×)")
    return failed


async def jitter_probe(frames_list: list[int], seconds: float = 8.0) -> list[dict[str, Any]]:
    """The receive hop alone: one aiortc peer sends 20 ms frames to another over loopback; each
    frame's delay from `recv()` handing it to the sender to `recv()` giving it out at the far end,
    with the far end's jitter buffer holding each of `frames_list` frames (the same run, in turn)."""
    from agent.transports.webrtc import use_loopback_candidates

    use_loopback_candidates()
    out = []
    for frames in frames_list:
        kept = (await _probe_once(frames, seconds))[int(seconds * 50) // 4 :]  # past the connection's start
        out.append({"jitter_frames": frames, "frames": len(kept),
                    "p50_ms": round(1000 * float(np.percentile(kept, 50)), 1) if kept else None,
                    "p95_ms": round(1000 * float(np.percentile(kept, 95)), 1) if kept else None})
    return out


async def _probe_once(frames: int, seconds: float) -> list[float]:
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    from agent.transports.webrtc import set_receive_jitter

    sent: dict[int, float] = {}
    delays: list[float] = []

    class Tone(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.n, self.t0 = 0, time.monotonic()

        async def recv(self) -> Any:
            await asyncio.sleep(max(0.0, self.t0 + self.n * 0.02 - time.monotonic()))
            pcm = (np.sin(np.arange(FRAME) / 5.0) * 8000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = RATE, self.n * FRAME
            frame.time_base = fractions.Fraction(1, RATE)
            sent[self.n * FRAME * 3] = time.monotonic()  # Opus runs at 48 kHz: pts × 3 at the far end
            self.n += 1
            return frame

    async def listen(track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if (t := sent.get(int(frame.pts))) is not None:
                delays.append(time.monotonic() - t)

    a, b = RTCPeerConnection(RTCConfiguration(iceServers=[])), RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tasks: list[asyncio.Task[None]] = []
    b.on("track", lambda track: tasks.append(asyncio.ensure_future(listen(track))))
    a.addTrack(Tone())
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    set_receive_jitter(b, frames)
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(b.localDescription)
    await asyncio.sleep(seconds)
    await a.close()
    await b.close()
    for task in tasks:
        task.cancel()
    return delays


def hops_markdown(results: list[dict[str, Any]]) -> str:
    """p50 / p95 of every hop (ms), one column per run (e.g. before and after)."""
    names = [n for n, _ in HOPS] + ["peer_playout"]
    head = "| hop (ms, p50 / p95) | " + " | ".join(
        f"{r['peers']} peers, jitter server {r.get('server_receive_jitter_frames')} peer {r.get('peer_jitter_frames')}"
        for r in results) + " |"
    rows = [head, "|---|" + "---|" * len(results)]

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{1000 * v:.0f}"

    for n in names:
        rows.append(f"| {n} | " + " | ".join(f"{ms(r['hops'][n]['p50'])} / {ms(r['hops'][n]['p95'])}" for r in results) + " |")
    rows.append("| **voice to voice** | " + " | ".join(f"{ms(r['v2v_p50_s'])} / {ms(r['v2v_p95_s'])}" for r in results) + " |")
    rows.append("| premature cut-offs | " + " | ".join(str(r["premature_cutoffs"]) for r in results) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench latency", description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--peers", type=ints, default=[1, 4, 8, 16], help="peer counts, e.g. 1,4,8,16")
    parser.add_argument("--processes", type=ints, default=[1, 2], help="frontend processes of the server, e.g. 1,2")
    parser.add_argument("--backend", default="scripted", help="scripted (default) | tiny-random | a --model value")
    parser.add_argument("--token-ms", type=float, default=25.0, help="scripted answers: ms per token (default 25)")
    parser.add_argument("--tts", default="espeak", help="speech out engine (default espeak)")
    parser.add_argument("--utterances", type=int, default=4, help="utterances per peer (default 4)")
    parser.add_argument("--client-processes", type=int, help="processes the peers are spread over (default: cores, ≤ 4)")
    parser.add_argument("--quick", action="store_true", help="2 peers, 1 process, 2 utterances; targets not checked")
    parser.add_argument("--peer-jitter-frames", type=int, default=1,
                        help="frames the test peers hold received audio (aiortc's default: 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--hops-markdown", nargs="+", metavar="JSON",
                        help="print the hop table of earlier --json runs (each a column) and exit")
    parser.add_argument("--jitter-probe", action="store_true",
                        help="measure only the receive hop (aiortc's 4-frame jitter buffer against 1) and exit")
    args = parser.parse_args(argv)
    if args.jitter_probe:
        probe = asyncio.run(jitter_probe([4, 1, 4, 1]))
        print("| receive jitter buffer | frames | send → recv p50 ms | p95 ms |\n|---|---|---|---|")
        for v in probe:
            print(f"| {v['jitter_frames']} frames | {v['frames']} | {v['p50_ms']} | {v['p95_ms']} |")
        if args.json:
            print(json.dumps({"benchmark": "latency-jitter-probe", "probe": probe}))
        return 0
    if args.hops_markdown:
        print(hops_markdown([json.loads(Path(p).read_text().strip().splitlines()[-1]) for p in args.hops_markdown]))
        return 0
    if args.quick:
        args.peers, args.processes, args.utterances = [2], [1], 2
    if min(args.peers) < 1 or min(args.processes) < 1 or not 1 <= args.utterances <= len(UTTERANCES) * 4:
        parser.error("--peers and --processes must be ≥ 1, --utterances 1–16")
    result = bench(args)
    failed = [] if args.quick else check_targets(result)
    result["targets_failed"] = failed
    print(f"voice to voice, {args.backend} answers ({args.token_ms:g} ms/token), {args.tts} speech out")
    print(f"{'frontends':>9} {'peers':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'answered':>9} {'premature':>9} "
          f"{'server cores/peer':>17} {'client cores/peer':>17}")
    for processes, entry in result["by_processes"].items():
        for n, p in entry["by_peers"].items():
            print(f"{processes:>9} {n:>5} {p['v2v_p50_s']!s:>7} {p['v2v_p95_s']!s:>7} {p['v2v_max_s']!s:>7} "
                  f"{p['answered']:>4}/{p['turns']:<4} {p['premature_cutoffs']:>9} {p['server_cpu_per_peer']:>17} "
                  f"{p['client_cpu_per_peer']:>17}")
        print(f"{processes:>9} frontend(s) serve {entry['peers_within_p95']} peers within p95 ≤ {TARGET_P95_S} s")
    print(f"baseline (today's turn-taking) at {result['peers']} peers: p50 {result['baseline_v2v_p50_s']} s, "
          f"speedup {result['speedup_p50_vs_baseline']}; premature cut-offs {result['premature_cutoffs']} vs "
          f"{result['baseline_premature_cutoffs']}")
    print(hops_markdown([result]))
    for line in failed:
        print(f"target missed: {line}")
    if args.json:
        print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
