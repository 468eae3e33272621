"""The user's turn in progress (agent/listener.py): uncommitted speech with manual turns, bounded."""

from __future__ import annotations

import numpy as np

import agent.listener as listener
from agent import turns
from agent.listener import Listener
from agent.preempt import Preemption


def part(start: float, seconds: float) -> turns.TurnCommitted:
    return turns.TurnCommitted(start, start + seconds, np.full(int(seconds * 16000), 0.1, np.float32))


def test_uncommitted_speech_is_one_turn_and_drops_its_oldest_part_beyond_the_bound(monkeypatch) -> None:
    monkeypatch.setattr(listener, "MAX_UNCOMMITTED_S", 3.5)
    ears = Listener(None, turns.TurnDetector(turns.TurnConfig()), Preemption(), None,  # type: ignore[arg-type]
                    lambda coro, name: None, "s")
    for i in range(3):
        ears.keep(part(i * 2.0, 1.0))
    assert ears.uncommitted_dropped_s == 0.0
    ears.keep(part(6.0, 1.0))  # 4 s kept > 3.5 s: the oldest part goes, logged and counted
    assert ears.uncommitted_dropped_s == 1.0 and [t.start for t in ears.uncommitted] == [2.0, 4.0, 6.0]
    turn = ears.take_uncommitted()
    assert turn is not None and (turn.start, turn.end) == (2.0, 7.0) and turn.audio.size == 3 * 16000
    assert ears.take_uncommitted() is None and ears.uncommitted == []
