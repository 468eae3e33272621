"""`voice-agent bench turns --calibrate`: fit the end-of-turn policy (agent/eot/policy.py) on the
calibration half of the real-speech corpus, and choose Smart Turn's window there.

1. Every silence the VAD finds in the calibration cases (the turn state machine run with no
   commit inside a case), labelled finished (the speech is over) or unfinished (more follows).
2. Smart Turn's P(complete) on windows with 0 and 0.2 s of silence after the speech: the
   window that separates the two best (ROC AUC) is `PAD_S`.
3. A logistic regression of the label on the policy's features: `WEIGHTS`.
4. The thresholds (`complete_threshold`, `incomplete_threshold`) that give the fewest premature
   cut-offs with a mean wait on finished turns ≤ 0.33 s (the 0.35 s target less a margin) and at
   most 5 % of finished turns waiting out max_silence_s — measured by replaying the calibration cases
   through the same state machine as `bench turns`.
It prints what to put in agent/eot/policy.py and the turn settings; nothing is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.bench import turns as bench
from agent.eot import policy
from agent.turns import SilenceBegan, TurnConfig, TurnDetector

PADS = (0.0, 0.2)
WAIT_MARGIN_S = 0.02
NO_COMMIT = TurnConfig(min_silence_s=3.0, min_silence_s_complete=3.0, max_silence_s=3.0)


@dataclass
class Event:
    case: int
    t: float
    audio: np.ndarray
    finished: bool


def events(utterances: list[bench.Utterance], probs: list[np.ndarray]) -> list[Event]:
    out = []
    for i, (u, p) in enumerate(zip(utterances, probs, strict=True)):
        det = TurnDetector(NO_COMMIT)
        for k, prob in enumerate(p):
            for s in det.feed(u.audio[k * bench.CHUNK : (k + 1) * bench.CHUNK], float(prob)):
                if isinstance(s, SilenceBegan):
                    if s.t >= u.parts[-1][1] - 0.15:
                        out.append(Event(i, s.t, s.audio, True))
                    elif s.t < u.parts[-1][0]:
                        out.append(Event(i, s.t, s.audio, False))
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    if not pos.size or not neg.size:
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """Newton's method, L2 on the weights (not the bias), features standardised inside."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([np.ones((x.shape[0], 1)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[0] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(z.shape[1])
        w -= np.linalg.solve(hess, grad)
    weights = w[1:] / sd
    return np.concatenate([[w[0] - float(weights @ mu)], weights])


class SmartTurnScores:
    """Smart Turn's P on a padded window, cached on disk by clip (the corpus's cache directory)."""

    def __init__(self) -> None:
        from agent.bench.corpus import cache_dir
        from agent.eot.smart_turn import SmartTurn

        self.path = cache_dir() / "smart-turn-windows.json"
        self.cache: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._model: SmartTurn | None = None
        self._factory = SmartTurn
        self.calls = 0  # model calls made (not cached)

    def save(self) -> None:
        """Merge with what is on disk (another run may have added scores) and write atomically."""
        try:
            self.cache = {**json.loads(self.path.read_text()), **self.cache}
        except (OSError, ValueError):
            pass
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.path)

    def __call__(self, clips: list[np.ndarray], pad: float) -> np.ndarray:
        keys = [f"{pad}:{hashlib.sha1(c.tobytes()).hexdigest()[:20]}" for c in clips]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            self._model = self._model or self._factory()
            self.calls += len(todo)
            for b in range(0, len(todo), 16):
                batch = todo[b : b + 16]
                got = self._model.predict([policy.window(clips[i], pad) for i in batch])
                for i, p in zip(batch, got, strict=True):
                    self.cache[keys[i]] = float(p)
            self.save()
        return np.array([self.cache[k] for k in keys])


def calibrate() -> dict[str, Any]:
    utterances = bench.real("calibrate")
    probs = bench.vad_probs(utterances)
    evs = events(utterances, probs)
    labels = np.array([e.finished for e in evs])
    scores = SmartTurnScores()
    by_pad = {pad: scores([e.audio for e in evs], pad) for pad in PADS}
    aucs = {pad: round(auc(p, labels), 4) for pad, p in by_pad.items()}
    pad = max(aucs, key=lambda k: aucs[k])
    feats = [policy.features(e.audio, float(p)) for e, p in zip(evs, by_pad[pad], strict=True)]
    x = np.stack([f.vector() for f in feats])
    weights = fit_logistic(x, labels.astype(np.float64))
    combined = np.array([policy.combine(f, tuple(weights)) for f in feats])
    result: dict[str, Any] = {
        "events": {"finished": int(labels.sum()), "unfinished": int((~labels).sum())},
        "auc_smart_turn_by_pad_s": aucs, "pad_s": pad, "auc_policy": round(auc(combined, labels), 4),
        "auc_by_feature": {n: round(auc(x[:, j], labels), 4) for j, n in enumerate(policy.USED)},
        "weights": [round(float(w), 4) for w in weights],
    }

    memo: dict[str, float] = {}

    def verdict(index: int, t: float, audio: np.ndarray) -> tuple[float | None, float]:
        key = hashlib.sha1(audio.tobytes()).hexdigest()
        if key not in memo:
            (p,) = scores([audio], pad)
            memo[key] = policy.combine(policy.features(audio, float(p)), tuple(weights))
        return memo[key], 0.0

    counts: dict[str, int] = {}
    for u in utterances:
        counts[u.kind] = counts.get(u.kind, 0) + 1
    base = TurnConfig()
    fixed = bench.summary(bench.score(utterances, probs, base, None), counts, base.max_silence_s)
    best: tuple[float, float, float, float] | None = None  # (premature, mean wait, hi, lo)
    grid = []
    for hi in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        for lo in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5):
            if lo > hi:
                continue
            config = replace(base, complete_threshold=hi, incomplete_threshold=lo)
            s = bench.summary(bench.score(utterances, probs, config, verdict), counts, config.max_silence_s)
            # the targets, with a margin on the mean wait (the held-out half is another sample)
            ok = (s["premature_cutoffs"] <= fixed["premature_cutoffs"]
                  and (s["complete_waited_max_share"] or 0) <= bench.MAX_WAITED_SHARE
                  and s["mean_wait_complete_s"] <= bench.MAX_MEAN_WAIT_S - WAIT_MARGIN_S)
            grid.append({"hi": hi, "lo": lo, "premature": s["premature_cutoffs"],
                         "mean_wait": s["mean_wait_complete_s"], "waited_max": s["complete_waited_max"], "ok": ok})
            rank = (s["premature_cutoffs"], s["mean_wait_complete_s"])
            if ok and (best is None or rank < best[:2]):
                best = (*rank, hi, lo)
    result["fixed"] = {k: fixed[k] for k in ("premature_cutoffs", "mean_wait_complete_s")}
    result["grid"] = grid
    result["thresholds"] = None if best is None else {"complete": best[2], "incomplete": best[3],
                                                       "premature": best[0], "mean_wait": best[1]}
    scores.save()
    return result


def main() -> int:
    result = calibrate()
    for row in result.pop("grid"):
        print(row)
    print(json.dumps(result, indent=1))
    return 0
