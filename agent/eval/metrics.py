"""What a case's events are checked against: WER, tool calls, answers, turns, latency.

WER: `jiwer` (the reference WER library: Levenshtein alignment on words via rapidfuzz) on
texts normalised by Whisper's English normaliser (`whisper-normalizer`: the normaliser
published with Whisper, and the one Qwen2-Audio's LibriSpeech figures use — case, punctuation,
numbers, British/American spellings, "Mr." → "mister"), so "Turn on the light." and "turn on
the light" are the same words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from agent.eval.suite import AnswerExpect, ToolCallExpect


@cache
def _normaliser() -> Any:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalise(text: str) -> str:
    return " ".join(_normaliser()(text).split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(errors, reference words) after normalisation: substitutions + deletions + insertions."""
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return len(hyp.split()), 0
    if not hyp:
        return len(ref.split()), len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def wer(errors: int, words: int) -> float:
    return errors / words if words else float(errors > 0)


def tool_call_matches(expected: ToolCallExpect, calls: Sequence[dict[str, Any]]) -> bool:
    """A call of that name whose arguments include the expected ones, with equal values."""
    return any(c["name"] == expected.name and all(k in c["arguments"] and c["arguments"][k] == v
                                                  for k, v in expected.arguments.items()) for c in calls)


def _mentions(text: str, label: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(normalise(label))}(?!\w)", normalise(text)) is not None


def answer_problem(expected: AnswerExpect, text: str) -> str | None:
    """Why the answer does not match (None: it does)."""
    if expected.contains is not None:
        wanted = [expected.contains] if isinstance(expected.contains, str) else expected.contains
        missing = [w for w in wanted if w.lower() not in text.lower()]
        if missing:
            return f"answer {text!r} does not contain {', '.join(map(repr, missing))}"
    if expected.regex is not None and re.search(expected.regex, text, re.IGNORECASE) is None:
        return f"answer {text!r} does not match /{expected.regex}/"
    if expected.one_of is not None:
        named = [label for label in expected.one_of if _mentions(text, label)]
        if len(named) != 1:
            return f"answer {text!r} names {len(named)} of the labels {expected.one_of}, not exactly one"
        if expected.label is not None and named[0] != expected.label:
            return f"answer {text!r} says {named[0]!r}, expected {expected.label!r}"
    return None


def turns_problem(expected: int | list[tuple[float, float]], got: list[tuple[float, float]],
                  tolerance_s: float) -> str | None:
    if isinstance(expected, int):
        return None if len(got) == expected else f"{len(got)} turns, expected {expected}"
    if len(got) != len(expected):
        return f"{len(got)} turns {_spans(got)}, expected {len(expected)} {_spans(expected)}"
    for (s, e), (gs, ge) in zip(expected, got, strict=True):
        if abs(gs - s) > tolerance_s or abs(ge - e) > tolerance_s:
            return f"turns {_spans(got)}, expected {_spans(expected)} (± {tolerance_s} s)"
    return None


def _spans(spans: Sequence[tuple[float, float]]) -> str:
    return "[" + ", ".join(f"{s:.2f}–{e:.2f}" for s, e in spans) + "]"


def percentile(values: Sequence[float], q: float) -> float | None:
    """numpy's (linear) percentile; None for no values."""
    return float(np.percentile(values, q)) if len(values) else None
