"""`voice-agent bench turns`: an audio end-of-turn model against the fixed silence rule.

The same utterances, the same Silero VAD probabilities, the same turn state machine
(`agent.turns`), two ways to end a turn, side by side:

- baseline: commit after `min_silence_s` (0.5 s) of silence, whatever was said;
- the model (`--detector`, default `smart-turn`): its verdict on each silence commits a
  complete turn after `min_silence_s_complete`, waits up to `max_silence_s` on an
  incomplete one, keeps the fixed rule when it fails — exactly as a session runs it.

Speech: espeak-ng (+ sox), 16 kHz. Complete turns (one sentence, then silence) give the
wait: end of speech → commit. Broken turns give premature cut-offs (a commit inside the
utterance): a pause of 0.4–1.2 s after a filler ("turn on the, um … kitchen light") or
mid-sentence without one ("turn on the … kitchen light"). espeak's flat prosody makes a
fragment like "turn on the" sound finished to an audio model, so the mid-sentence case is
the hard one and is reported on its own. The wait counts the model's own latency where it
is longer than the silence it decides (the session awaits the verdict before it reads on).

Recorded human speech: none of the packages installed here ships any with turn marks (see
README); `--wav FILE --marks FILE` runs the same measure on a recording of one speaker, the
marks one `start end complete|pause` line per utterance part (seconds).

`--json` prints one JSON object as the last line; exit code 0 when the model made fewer
premature cut-offs than the baseline and a shorter mean wait on complete turns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.speech import silence, utterance
from agent.model.qwen2_audio import SAMPLE_RATE
from agent.turns import SilenceBegan, TurnCommitted, TurnConfig, TurnDetector

CHUNK = 512
COMPLETE = ["turn on the kitchen light", "what is the weather like today", "set a timer for ten minutes",
            "play some music in the living room", "how long does it take to boil an egg",
            "switch off all the lights downstairs", "remind me to call my mother tomorrow",
            "what time is it in Tokyo", "add milk to the shopping list", "tell me a joke",
            "lock the front door", "how far away is the moon", "turn the volume down a little",
            "call my sister", "is it going to rain this afternoon", "good night"]
# (before the pause, after it): the filler cases say "um" / "uh" before the pause.
BROKEN = [("turn on the", "kitchen light"), ("set a timer for", "ten minutes"),
          ("play some music in the", "living room"), ("remind me to", "call my mother tomorrow"),
          ("what is the weather like in", "Paris"), ("switch off the lights and", "lock the door")]
FILLERS = ["um", "uh"]
PAUSES = [0.4, 0.6, 0.8, 1.0, 1.2]
TAIL_S = 2.5  # silence after each utterance: more than max_silence_s


@dataclass
class Utterance:
    kind: str  # complete | filler | mid_sentence | human
    text: str
    audio: np.ndarray = field(repr=False)
    parts: list[tuple[float, float]]  # spoken parts (s); a commit before the last part's start is premature


@dataclass
class Outcome:
    premature: int = 0  # utterances cut at least once inside
    waits: list[float] = field(default_factory=list)  # end of speech → final commit, complete utterances
    final_waits: list[float] = field(default_factory=list)  # the same on broken ones that were not cut
    missed: int = 0  # utterances never committed (not expected: the tail is long enough)


def _join(pieces: list[str | float], tmp: Path) -> tuple[np.ndarray, list[tuple[float, float]]]:
    speech, parts = utterance(pieces, cache=tmp)  # espeak's clips kept in tmp: a text is made once
    lead = 0.5
    return (np.concatenate([silence(lead), speech, silence(TAIL_S)]),
            [(start + lead, end + lead) for start, end in parts])


def generated(pauses: list[float]) -> list[Utterance]:
    utterances = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for text in COMPLETE:
            audio, parts = _join([text], tmp)
            utterances.append(Utterance("complete", text, audio, parts))
        for i, (before, after) in enumerate(BROKEN):
            for pause in pauses:
                filler = FILLERS[i % len(FILLERS)]
                audio, parts = _join([f"{before}, {filler}", pause, after], tmp)
                utterances.append(Utterance("filler", f"{before}, {filler} … {after}", audio, parts))
                audio, parts = _join([before, pause, after], tmp)
                utterances.append(Utterance("mid_sentence", f"{before} … {after}", audio, parts))
    return utterances


def recorded(wav: str, marks: str) -> list[Utterance]:
    """One utterance per `complete` mark, with the `pause` parts before it."""
    from agent.audio import read_file

    audio = read_file(wav)
    utterances, parts = [], []
    for line in Path(marks).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        start, end, label = line.split()[:3]
        parts.append((float(start), float(end)))
        if label == "complete":
            first = max(0, int((parts[0][0] - 0.5) * SAMPLE_RATE))
            last = min(audio.size, int((parts[-1][1] + TAIL_S) * SAMPLE_RATE))
            shifted = [(a - first / SAMPLE_RATE, b - first / SAMPLE_RATE) for a, b in parts]
            utterances.append(Utterance("human", f"{wav}@{parts[0][0]:.1f}", audio[first:last], shifted))
            parts = []
    return utterances


def vad_probs(utterances: list[Utterance]) -> list[np.ndarray]:
    """Silero's probability per 32 ms chunk, all utterances in one batch per chunk."""
    from agent.vad import BatchedSilero

    model = BatchedSilero()
    n = max(u.audio.size for u in utterances) // CHUNK
    padded = np.zeros((len(utterances), n * CHUNK), np.float32)
    for i, u in enumerate(utterances):
        padded[i, : min(u.audio.size, n * CHUNK)] = u.audio[: n * CHUNK]
    states = [model.new_state() for _ in utterances]
    probs = np.stack([model.forward(padded[:, k * CHUNK : (k + 1) * CHUNK], states) for k in range(n)], axis=1)
    return [probs[i, : u.audio.size // CHUNK] for i, u in enumerate(utterances)]


Verdict = Callable[[int, float, np.ndarray], tuple[float | None, float]]
# (utterance, silence start, audio) → (P(complete), seconds the model took)


def run(index: int, utterance: Utterance, probs: np.ndarray, config: TurnConfig,
        verdict: Verdict | None) -> tuple[list[float], float]:
    """Commit times (s) on the audio clock, plus the wait the model's latency adds to the last one."""
    det = TurnDetector(config)
    commits: list[float] = []
    extra = 0.0
    silence: tuple[float, float] = (0.0, 0.0)  # (start, model latency)
    for k, p in enumerate(probs):
        chunk = utterance.audio[k * CHUNK : (k + 1) * CHUNK]
        for signal in det.feed(chunk, float(p)):
            if isinstance(signal, SilenceBegan) and verdict is not None:
                prob, took = verdict(index, signal.t, signal.audio)
                det.set_verdict(signal.t, prob)
                silence = (signal.t, took)
            elif isinstance(signal, TurnCommitted):
                now = (k + 1) * CHUNK / SAMPLE_RATE
                commits.append(now)
                # Live, the detector reads on only once the verdict is in.
                extra = max(0.0, silence[0] + silence[1] - now) if signal.end == silence[0] else 0.0
    return commits, extra


def score(utterances: list[Utterance], probs: list[np.ndarray], config: TurnConfig,
          verdict: Verdict | None) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    for i, (u, p) in enumerate(zip(utterances, probs, strict=True)):
        o = out.setdefault(u.kind, Outcome())
        commits, extra = run(i, u, p, config, verdict)
        last_start, end = u.parts[-1]
        if any(c < last_start for c in commits):
            o.premature += 1
        elif not commits:
            o.missed += 1
        else:
            (o.waits if u.kind == "complete" else o.final_waits).append(commits[-1] - end + extra)
    return out


def summary(outcomes: dict[str, Outcome], counts: dict[str, int], max_silence_s: float) -> dict[str, Any]:
    def mean(values: list[float]) -> float | None:
        return round(statistics.fmean(values), 3) if values else None

    complete = outcomes.get("complete", Outcome())
    broken = [k for k in outcomes if k != "complete"]
    return {
        "premature_cutoffs": sum(outcomes[k].premature for k in broken),
        "premature_by_kind": {k: f"{outcomes[k].premature}/{counts[k]}" for k in broken},
        "mean_wait_complete_s": mean(complete.waits),
        "max_wait_complete_s": round(max(complete.waits), 3) if complete.waits else None,
        # complete turns taken for unfinished: they waited out max_silence_s
        "complete_waited_max": f"{sum(w >= max_silence_s for w in complete.waits)}/{counts.get('complete', 0)}",
        "mean_wait_broken_s": mean([w for k in broken for w in outcomes[k].final_waits]),
        "missed": sum(o.missed for o in outcomes.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench turns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--detector", default="smart-turn", help="a voice_agent.turn_detectors entry point")
    parser.add_argument("--min-silence", type=float, default=0.5, help="the fixed rule (s; default 0.5)")
    parser.add_argument("--min-silence-complete", type=float, default=0.2, help="model says complete (s)")
    parser.add_argument("--max-silence", type=float, default=2.0, help="model says incomplete (s)")
    parser.add_argument("--complete-threshold", type=float, default=0.5, help="P(complete) ≥ this: complete")
    parser.add_argument("--incomplete-threshold", type=float, default=0.5,
                        help="P(complete) < this: incomplete (between the two: the fixed rule)")
    parser.add_argument("--sweep", action="store_true",
                        help="also report other threshold pairs (the model's verdicts are reused)")
    parser.add_argument("--pauses", type=lambda s: [float(x) for x in s.split(",")], default=PAUSES,
                        help="pause lengths inside broken utterances (s, comma-separated)")
    parser.add_argument("--wav", help="a recording of one speaker (16 kHz mono or any rate av reads)")
    parser.add_argument("--marks", help="its parts: `start end complete|pause` per line (with --wav)")
    args = parser.parse_args(argv)
    if bool(args.wav) != bool(args.marks):
        parser.error("--wav and --marks go together")

    import torch

    from agent.eot import detector_factory

    torch.set_num_threads(1)
    if args.wav:
        utterances = recorded(args.wav, args.marks)
        source = f"recording {args.wav}"
    else:
        if not (shutil.which("espeak-ng") and shutil.which("sox")):
            print("bench turns needs espeak-ng and sox (apt-get install espeak-ng sox)", file=sys.stderr)
            return 2
        utterances = generated(args.pauses)
        source = "espeak-ng en-us 150 wpm"
    counts: dict[str, int] = {}
    for u in utterances:
        counts[u.kind] = counts.get(u.kind, 0) + 1
    probs = vad_probs(utterances)
    model = detector_factory(args.detector)()
    latencies: list[float] = []
    cache: dict[tuple[int, float], tuple[float | None, float]] = {}

    def verdict(index: int, t: float, audio: np.ndarray) -> tuple[float | None, float]:
        if (index, t) in cache:  # the same silence of the same utterance: the same answer
            return cache[index, t]
        t0 = time.perf_counter()
        try:
            p: float | None = float(model.predict([audio])[0])
        except Exception as exc:  # the session's rule: a failing model leaves the fixed rule
            print(f"model failed: {exc}", file=sys.stderr)
            p = None
        took = time.perf_counter() - t0
        latencies.append(took)
        cache[index, t] = (p, took)
        return p, took

    def config(complete: float, incomplete: float) -> TurnConfig:
        return TurnConfig(min_silence_s=args.min_silence,
                          min_silence_s_complete=min(args.min_silence_complete, args.min_silence),
                          max_silence_s=max(args.max_silence, args.min_silence),
                          complete_threshold=complete, incomplete_threshold=min(incomplete, complete))

    fixed = config(args.complete_threshold, args.incomplete_threshold)
    base = summary(score(utterances, probs, fixed, None), counts, fixed.max_silence_s)
    model_side = summary(score(utterances, probs, fixed, verdict), counts, fixed.max_silence_s)
    sweep = {}
    if args.sweep:
        for complete, incomplete in ((0.5, 0.5), (0.5, 0.1), (0.3, 0.1), (0.2, 0.1), (0.1, 0.1)):
            s = summary(score(utterances, probs, config(complete, incomplete), verdict), counts, fixed.max_silence_s)
            sweep[f"{complete}/{incomplete}"] = {k: s[k] for k in ("premature_cutoffs", "premature_by_kind",
                                                                    "mean_wait_complete_s")}
    held = (model_side["premature_cutoffs"] < base["premature_cutoffs"]
            and (model_side["mean_wait_complete_s"] or 0) < (base["mean_wait_complete_s"] or 0))
    result = {
        "source": source, "utterances": counts, "detector": args.detector,
        "settings": {"min_silence_s": args.min_silence, "min_silence_s_complete": fixed.min_silence_s_complete,
                     "max_silence_s": fixed.max_silence_s, "complete_threshold": fixed.complete_threshold,
                     "incomplete_threshold": fixed.incomplete_threshold},
        **model_side,
        **{f"baseline_{k}": v for k, v in base.items()},
        "model_calls": len(latencies),
        "model_ms_p50": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "targets_met": held,
    }
    if sweep:
        result["sweep_complete/incomplete_threshold"] = sweep
    print(f"{len(utterances)} utterances ({source}); detector {args.detector} vs fixed {args.min_silence} s")
    print(f"{'':24}{'fixed rule':>14}{args.detector:>14}")
    for key in ("premature_cutoffs", "mean_wait_complete_s", "max_wait_complete_s", "complete_waited_max",
                "mean_wait_broken_s"):
        print(f"{key:24}{base[key]!s:>14}{model_side[key]!s:>14}")
    for kind in model_side["premature_by_kind"]:
        print(f"  premature, {kind:12}{base['premature_by_kind'][kind]:>14}{model_side['premature_by_kind'][kind]:>14}")
    for pair, s in sweep.items():
        print(f"thresholds {pair:9}: premature {s['premature_cutoffs']} {s['premature_by_kind']}, "
              f"mean wait on complete turns {s['mean_wait_complete_s']} s")
    print(f"model: {len(latencies)} calls, p50 {result['model_ms_p50']} ms; targets {'met' if held else 'MISSED'}")
    if args.json:
        print(json.dumps(result))
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
