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
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
FINISHED = ("complete", "statement", "question")  # case kinds that are whole turns
MAX_MEAN_WAIT_S = 0.35  # issue 31's targets for the default policy
MAX_WAITED_SHARE = 0.05


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
    """One utterance per `complete` mark, with the `pause` parts before it: a finished turn
    (`complete`) when it has no pause, an unfinished one until its last part (`pause`) otherwise."""
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
            kind = "complete" if len(parts) == 1 else "pause"
            utterances.append(Utterance(kind, f"{wav}@{parts[0][0]:.1f}", audio[first:last], shifted))
            parts = []
    return utterances


def real(split: str) -> list[Utterance]:
    """The real-speech corpus (agent.bench.corpus): its cases of one split (or `all`)."""
    from agent.bench.corpus import cases, room_tone, sentences

    out = []
    for c in cases(sentences()):
        if split in ("all", c.split):
            parts = [(a + 0.3, b + 0.3) for a, b in c.parts]
            audio = np.concatenate([room_tone(c.audio, 0.3), c.audio, room_tone(c.audio, TAIL_S)])
            out.append(Utterance(c.kind, c.id, audio, parts))
    return out


def vad_probs(utterances: list[Utterance], batch: int = 64) -> list[np.ndarray]:
    """Silero's probability per 32 ms chunk, `batch` utterances at a time in one batch per chunk."""
    from agent.vad import BatchedSilero

    model = BatchedSilero()
    out: list[np.ndarray] = []
    for b in range(0, len(utterances), batch):
        group = utterances[b : b + batch]
        n = max(u.audio.size for u in group) // CHUNK
        padded = np.zeros((len(group), n * CHUNK), np.float32)
        for i, u in enumerate(group):
            padded[i, : min(u.audio.size, n * CHUNK)] = u.audio[: n * CHUNK]
        states = [model.new_state() for _ in group]
        probs = np.stack([model.forward(padded[:, k * CHUNK : (k + 1) * CHUNK], states) for k in range(n)], axis=1)
        out += [probs[i, : u.audio.size // CHUNK] for i, u in enumerate(group)]
    return out


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
    """Per kind: utterances cut inside (a commit before the last part starts), and the wait from
    the end of speech to the commit, on finished turns (`waits`) and on unfinished ones not cut."""
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
            (o.waits if u.kind in FINISHED else o.final_waits).append(commits[-1] - end + extra)
    return out


def summary(outcomes: dict[str, Outcome], counts: dict[str, int], max_silence_s: float) -> dict[str, Any]:
    def mean(values: list[float]) -> float | None:
        return round(statistics.fmean(values), 3) if values else None

    finished = [k for k in outcomes if k in FINISHED]
    broken = [k for k in outcomes if k not in FINISHED]
    waits = [w for k in finished for w in outcomes[k].waits]
    n_finished = sum(counts[k] for k in finished)
    waited_max = sum(w >= max_silence_s for w in waits)
    return {
        # every cut inside an utterance: at an inserted pause, or at a pause of the speaker's own
        "premature_cutoffs": sum(o.premature for o in outcomes.values()),
        "premature_by_kind": {k: f"{outcomes[k].premature}/{counts[k]}" for k in outcomes},
        "mean_wait_complete_s": mean(waits),
        "mean_wait_by_kind_s": {k: mean(outcomes[k].waits) for k in finished},
        "max_wait_complete_s": round(max(waits), 3) if waits else None,
        # finished turns taken for unfinished: they waited out max_silence_s
        "complete_waited_max": f"{waited_max}/{n_finished}",
        "complete_waited_max_share": round(waited_max / n_finished, 3) if n_finished else None,
        "mean_wait_broken_s": mean([w for k in broken for w in outcomes[k].final_waits]),
        "missed": sum(o.missed for o in outcomes.values()),
    }


def targets(policy: dict[str, Any], fixed: dict[str, Any]) -> dict[str, bool]:
    """Issue 31's targets for the default policy, against the fixed rule on the same speech."""
    wait, share = policy["mean_wait_complete_s"], policy["complete_waited_max_share"]
    return {"premature_le_fixed": policy["premature_cutoffs"] <= fixed["premature_cutoffs"],
            "mean_wait_le_0.35s": wait is not None and wait <= MAX_MEAN_WAIT_S,
            "waited_max_le_5pct": share is not None and share <= MAX_WAITED_SHARE}


class VerdictCache:
    """One detector's verdicts, reused: the same clip gets the same answer. On the real corpus,
    Smart Turn's scores are kept on disk (shared by `smart-turn` and `smart-turn-prosody`, whose
    combination is recomputed), so a re-run calls the model only for clips it never saw; those
    verdicts count no model latency (see `model_ms_p50` for what the calls took)."""

    def __init__(self, name: str, cached: bool) -> None:
        from agent.eot import detector_factory

        self.name = name
        self._model: Any = None
        self._factory = detector_factory(name)
        self._scores: Any = None
        if cached and name in ("smart-turn", "smart-turn-prosody"):
            from agent.bench.turns_calibrate import SmartTurnScores

            self._scores = SmartTurnScores()
        self.latencies: list[float] = []
        self._memo: dict[str, tuple[float | None, float]] = {}

    def __call__(self, index: int, t: float, audio: np.ndarray) -> tuple[float | None, float]:
        key = hashlib.sha1(audio.tobytes()).hexdigest()
        if key not in self._memo:
            self._memo[key] = self._verdict(audio)
        return self._memo[key]

    def _verdict(self, audio: np.ndarray) -> tuple[float | None, float]:
        if self._scores is not None:
            from agent.eot import policy

            t0, calls = time.perf_counter(), self._scores.calls
            (p,) = self._scores([audio], policy.PAD_S if self.name == "smart-turn-prosody" else 0.0)
            if self._scores.calls > calls:
                self.latencies.append(time.perf_counter() - t0)
            if self.name == "smart-turn-prosody":
                p = policy.combine(policy.features(audio, float(p)))
            return float(p), 0.0
        if self._model is None:
            self._model = self._factory()
        t0 = time.perf_counter()
        try:
            prob: float | None = float(self._model.predict([audio])[0])
        except Exception as exc:  # the session's rule: a failing model leaves the fixed rule
            print(f"model failed: {exc}", file=sys.stderr)
            prob = None
        took = time.perf_counter() - t0
        self.latencies.append(took)
        return prob, took


def main(argv: list[str] | None = None) -> int:
    from agent.config import TurnSettings

    defaults = TurnSettings()
    parser = argparse.ArgumentParser(prog="voice-agent bench turns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--out", help="also write that JSON object to this file (e.g. bench-results/turns-real.json)")
    parser.add_argument("--table", metavar="JSON", help="print the markdown table of a result file, run nothing")
    parser.add_argument("--corpus", choices=("real", "espeak"), default="real",
                        help="real: recorded human speech (agent/bench/corpus.py, fetched with apt-get); "
                             "espeak: generated (default: real)")
    parser.add_argument("--split", choices=("held_out", "calibrate", "all"), default="held_out",
                        help="which part of the real corpus (default: held_out, the part the policy was not fitted on)")
    parser.add_argument("--detector", default=defaults.end_of_turn,
                        help=f"the end-of-turn policy measured (default: the configured default, {defaults.end_of_turn})")
    parser.add_argument("--min-silence", type=float, default=defaults.min_silence_s, help="the fixed rule (s)")
    parser.add_argument("--min-silence-complete", type=float, default=defaults.min_silence_s_complete,
                        help="the policy says complete (s)")
    parser.add_argument("--max-silence", type=float, default=defaults.max_silence_s,
                        help="the policy says incomplete (s)")
    parser.add_argument("--complete-threshold", type=float, default=defaults.complete_threshold,
                        help="P(complete) ≥ this: complete")
    parser.add_argument("--incomplete-threshold", type=float, default=defaults.incomplete_threshold,
                        help="P(complete) < this: incomplete (between the two: the fixed rule)")
    parser.add_argument("--pauses", type=lambda s: [float(x) for x in s.split(",")], default=PAUSES,
                        help="espeak: pause lengths inside broken utterances (s, comma-separated)")
    parser.add_argument("--wav", help="a recording of one speaker (16 kHz mono or any rate av reads)")
    parser.add_argument("--marks", help="its parts: `start end complete|pause` per line (with --wav)")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the policy and choose Smart Turn's window on the calibration half (prints them)")
    args = parser.parse_args(argv)
    if bool(args.wav) != bool(args.marks):
        parser.error("--wav and --marks go together")
    if args.calibrate:
        from agent.bench.turns_calibrate import main as calibrate

        return calibrate()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0

    import torch

    from agent.eot import SILENCE

    torch.set_num_threads(1)
    cached = False
    if args.wav:
        utterances = recorded(args.wav, args.marks)
        source = f"recording {args.wav}"
    elif args.corpus == "real":
        from agent.bench.corpus import LICENCES

        utterances = real(args.split)
        source = f"real speech (agent.bench.corpus, split {args.split}; licences: {LICENCES})"
        cached = True
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

    policy = TurnConfig(min_silence_s=args.min_silence,
                        min_silence_s_complete=min(args.min_silence_complete, args.min_silence),
                        max_silence_s=max(args.max_silence, args.min_silence),
                        complete_threshold=args.complete_threshold,
                        incomplete_threshold=min(args.incomplete_threshold, args.complete_threshold))
    # Smart Turn as its authors run it: one threshold (0.5), complete or not.
    alone = replace(policy, complete_threshold=0.5, incomplete_threshold=0.5)
    rules: dict[str, tuple[TurnConfig, VerdictCache | None]] = {f"fixed {args.min_silence} s": (policy, None)}
    for name, config in (("smart-turn", alone), (args.detector, policy)):
        if name != SILENCE and name not in rules:
            rules[name] = (config, VerdictCache(name, cached))
    results: dict[str, dict[str, Any]] = {}
    for name, (config, verdict) in rules.items():
        results[name] = summary(score(utterances, probs, config, verdict), counts, config.max_silence_s)
        if verdict is not None:
            lat = verdict.latencies
            results[name]["model_calls"] = len(lat)
            results[name]["model_ms_p50"] = round(1000 * statistics.median(lat), 1) if lat else None
    fixed = results[f"fixed {args.min_silence} s"]
    measured = results[args.detector] if args.detector in results else fixed
    met = targets(measured, fixed)
    result = {
        "source": source, "utterances": counts, "detector": args.detector,
        "command": "voice-agent bench turns " + " ".join(argv if argv is not None else sys.argv[2:]),
        "settings": {"min_silence_s": policy.min_silence_s, "min_silence_s_complete": policy.min_silence_s_complete,
                     "max_silence_s": policy.max_silence_s, "complete_threshold": policy.complete_threshold,
                     "incomplete_threshold": policy.incomplete_threshold},
        "rules": results, "targets": met, "targets_met": all(met.values()),
    }
    print(f"{len(utterances)} utterances ({source})")
    print(table(result))
    print(f"targets for {args.detector}: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0 if result["targets_met"] else 1


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per case kind (with its utterance count), one column per rule."""
    rules = result["rules"]
    head = "| case kind | utterances | " + " | ".join(rules) + " |"
    lines = [head, "|" + "---|" * (2 + len(rules))]
    for kind, n in result["utterances"].items():
        cells = []
        for s in rules.values():
            cut = s["premature_by_kind"].get(kind, "–")
            wait = s["mean_wait_by_kind_s"].get(kind)
            cells.append(f"cut {cut}" + (f", wait {wait:.2f} s" if wait is not None else ""))
        lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    rows = (("premature cut-offs", "premature_cutoffs"), ("mean wait, finished turns (s)", "mean_wait_complete_s"),
            ("finished turns that waited max_silence_s", "complete_waited_max"),
            ("mean wait, unfinished turns not cut (s)", "mean_wait_broken_s"))
    for label, key in rows:
        lines.append(f"| {label} | | " + " | ".join(str(s[key]) for s in rules.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
