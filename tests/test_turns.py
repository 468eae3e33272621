"""The turn detector as a pure state machine: scripted probabilities, virtual time."""

import numpy as np
import pytest

from agent.turns import (
    SilenceBegan,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnCommitted,
    TurnConfig,
    TurnDetector,
)

CHUNK = 512
SR = 16000


def drive(probs: list[float], config: TurnConfig | None = None, flush: bool = True):
    """Feed chunks whose samples are their own global sample index, so audio is checkable."""
    det = TurnDetector(config)
    signals = []
    for i, p in enumerate(probs):
        chunk = np.arange(i * CHUNK, (i + 1) * CHUNK, dtype=np.float32)
        signals += [(i, s) for s in det.feed(chunk, p)]
    if flush:
        signals += [(len(probs), s) for s in det.flush()]
    return signals


def pattern(*spans: tuple[float, int]) -> list[float]:
    out: list[float] = []
    for p, n in spans:
        out += [p] * n
    return out


def test_one_utterance_sample_exact():
    cfg = TurnConfig(pre_roll_s=0.064, min_speech_s=0.064, min_silence_s=0.32)
    probs = pattern((0.0, 20), (0.9, 30), (0.1, 20))
    signals = [s for _, s in drive(probs, cfg)]
    kinds = [type(s) for s in signals]
    assert kinds == [SpeechStarted, SilenceBegan, SpeechStopped, TurnCommitted]
    started, began, stopped, turn = signals
    assert started.t == 20 * CHUNK / SR
    assert stopped.t == began.t == 50 * CHUNK / SR
    # pre-roll: 2 chunks (0.064 s) before the onset; the turn ends where silence began.
    assert turn.start == 18 * CHUNK / SR and turn.end == 50 * CHUNK / SR
    np.testing.assert_array_equal(turn.audio, np.arange(18 * CHUNK, 50 * CHUNK, dtype=np.float32))
    # The speculative audio equals the committed audio: a prefill can be reused as is.
    np.testing.assert_array_equal(began.audio, turn.audio)


def test_short_pause_keeps_one_turn_and_signals_resume():
    cfg = TurnConfig(min_silence_s=0.5)
    probs = pattern((0.0, 10), (0.9, 30), (0.1, 6), (0.9, 30), (0.0, 30))  # 0.19 s pause
    signals = [s for _, s in drive(probs, cfg)]
    assert sum(isinstance(s, TurnCommitted) for s in signals) == 1
    assert any(isinstance(s, SpeechResumed) for s in signals)


def test_hysteresis_between_thresholds_keeps_speech():
    cfg = TurnConfig(threshold=0.5, neg_threshold=0.35, min_silence_s=0.2)
    probs = pattern((0.9, 10), (0.4, 40), (0.0, 20))  # 0.4: not speech onset, not silence either
    turns = [s for _, s in drive(probs, cfg) if isinstance(s, TurnCommitted)]
    assert len(turns) == 1 and turns[0].end == pytest.approx(50 * CHUNK / SR)


def test_blip_shorter_than_min_speech_is_ignored():
    cfg = TurnConfig(min_speech_s=0.15)
    probs = pattern((0.0, 10), (0.9, 2), (0.0, 40))  # 64 ms click
    assert drive(probs, cfg) == []


def test_max_turn_splits_continuous_speech():
    cfg = TurnConfig(max_turn_s=2.0, pre_roll_s=0.0)
    n = int(5.0 * SR / CHUNK)
    signals = [s for _, s in drive(pattern((0.9, n)), cfg)]
    turns = [s for s in signals if isinstance(s, TurnCommitted)]
    assert [round(t.end - t.start, 3) for t in turns[:-1]] == [2.0, 2.0]
    assert all(t.end - t.start <= 2.0 for t in turns)
    # Contiguous and covering: each split starts where the last ended.
    assert all(a.end == b.start for a, b in zip(turns, turns[1:]))
    assert turns[0].start == 0.0 and turns[-1].end == pytest.approx(n * CHUNK / SR)
    assert [t.split for t in turns] == [True, True, False]


def test_flush_commits_turn_in_progress_without_trailing_silence():
    signals = [s for _, s in drive(pattern((0.0, 5), (0.9, 20), (0.1, 3)), TurnConfig(pre_roll_s=0.0))]
    turn = signals[-1]
    assert isinstance(turn, TurnCommitted) and turn.end == 25 * CHUNK / SR


def test_silence_only_gives_nothing():
    assert drive(pattern((0.01, 500))) == []


def test_reconfigure_min_silence_mid_stream():
    det = TurnDetector(TurnConfig(min_silence_s=1.0))
    det.reconfigure(min_silence_s=0.2)
    out = []
    for p in pattern((0.9, 20), (0.0, 10)):
        out += det.feed(np.zeros(CHUNK, np.float32), p)
    assert any(isinstance(s, TurnCommitted) for s in out)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        TurnConfig(threshold=0.3, neg_threshold=0.5)
    with pytest.raises(ValueError):
        TurnConfig(max_turn_s=45)
