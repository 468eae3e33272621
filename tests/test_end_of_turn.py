"""End of turn: adaptive endpointing in the turn state machine (a fake model's verdicts on
the detector's virtual clock), the batched Smart Turn service on real speech, the config keys."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from agent.config import ConfigError, load_settings
from agent.eot import EndOfTurnService, available_detectors, detector_factory
from agent.turns import SilenceBegan, TurnCommitted, TurnConfig, TurnDetector

CHUNK = 512
SR = 16000
CONFIG = TurnConfig(min_silence_s=0.5, min_silence_s_complete=0.2, max_silence_s=2.0)


def commit_after(verdict: float | None, *, give: bool = True, silence_chunks: int = 100) -> float | None:
    """Seconds of silence after which the turn commits, given the model's P(complete)."""
    det = TurnDetector(CONFIG)
    probs = [0.0] * 10 + [0.9] * 30 + [0.1] * silence_chunks
    began: SilenceBegan | None = None
    for i, p in enumerate(probs):
        for signal in det.feed(np.zeros(CHUNK, np.float32), p):
            if isinstance(signal, SilenceBegan):
                began = signal
                if give:
                    det.set_verdict(signal.t, verdict)
            elif isinstance(signal, TurnCommitted):
                assert began is not None and signal.end == began.t
                return round((i + 1) * CHUNK / SR - began.t, 3)
    return None


def test_complete_commits_early_incomplete_waits_to_max_failure_keeps_the_fixed_rule() -> None:
    assert commit_after(0.97) == pytest.approx(0.2, abs=0.033)  # "turn on the kitchen light."
    assert commit_after(0.02) == pytest.approx(2.0, abs=0.033)  # "turn on the, um …"
    assert commit_after(None) == pytest.approx(0.5, abs=0.033)  # the model failed
    assert commit_after(0.97, give=False) == pytest.approx(0.5, abs=0.033)  # the model is off


def test_a_verdict_on_an_earlier_silence_is_ignored() -> None:
    det = TurnDetector(CONFIG)
    chunk = np.zeros(CHUNK, np.float32)
    for p in [0.9] * 10:
        det.feed(chunk, p)
    (began,) = det.feed(chunk, 0.1)
    for p in [0.9] * 5:  # speech resumed: a new silence follows
        det.feed(chunk, p)
    det.feed(chunk, 0.1)
    det.set_verdict(began.t, 0.99)  # late, for the first silence
    signals = [s for _ in range(12) for s in det.feed(chunk, 0.1)]
    assert not any(isinstance(s, TurnCommitted) for s in signals)  # 0.38 s: still the fixed 0.5 s rule


def test_config_keys_are_validated(monkeypatch) -> None:
    settings = load_settings(None, turns={"end_of_turn": "smart-turn", "min_silence_s_complete": 0.15,
                                          "max_silence_s": 3, "preemptive": False})
    assert settings.turns.end_of_turn == "smart-turn" and settings.turns.to_turn_config().max_silence_s == 3
    assert "smart-turn" in available_detectors()
    for turns, message in (({"end_of_turn": "smart-trun"}, "available: silence, smart-turn"),
                           ({"min_silence_s_complete": 0.8}, "min_silence_s_complete <= min_silence_s"),
                           ({"max_silence_s": 0.3}, "min_silence_s <= max_silence_s"),
                           ({"preemptive": "sometimes"}, "preemptive"),
                           ({"preempt_after_s": 0}, "preempt_after_s")):
        with pytest.raises(ConfigError, match=message):
            load_settings(None, turns=turns)
    monkeypatch.setitem(os.environ, "VOICE_AGENT_TURNS__END_OF_TURN", "nope")
    with pytest.raises(ConfigError, match="unknown end-of-turn detector 'nope'"):
        load_settings(None)


async def test_smart_turn_scores_all_waiting_sessions_in_one_call(make_speech_fixture) -> None:
    complete = make_speech_fixture([0.3, "turn on the kitchen light", 0.1], "eot-complete")
    hesitant = make_speech_fixture([0.3, "turn on the, um", 0.1], "eot-um")
    service = EndOfTurnService(detector_factory("smart-turn"))
    await service.start()
    try:
        p_complete, p_um = await asyncio.gather(service.predict(complete.samples), service.predict(hesitant.samples))
    finally:
        await service.close()
    assert p_complete > 0.5 > p_um
    assert service.stats["calls"] == 1 and service.stats["clips"] == 2  # one model call, both sessions


async def test_a_failing_model_answers_none_and_is_counted() -> None:
    class Broken:
        name = "broken"

        def predict(self, clips: list[np.ndarray]) -> np.ndarray:
            raise RuntimeError("onnx on fire")

    service = EndOfTurnService(Broken)
    await service.start()
    try:
        assert await service.predict(np.zeros(SR, np.float32)) is None
    finally:
        await service.close()
    assert service.stats["failed"] == 1


async def _turns_committed(speech, end_of_turn: str) -> list:
    from agent import events as ev
    from agent.inference.scripted import ScriptedBackend
    from agent.runtime import AgentRuntime

    settings = load_settings(None, model="tiny-random", turns={"end_of_turn": end_of_turn})
    runtime = AgentRuntime(settings, backend=ScriptedBackend(default="ok"))
    await runtime.start()
    session, sub = runtime.open_session()
    for i in range(0, speech.samples.size, 4096):
        await session.push_audio(speech.samples[i : i + 4096])
    await session.wait_idle()
    await runtime.close()
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait())
    return [e for e in events if isinstance(e, ev.TurnCommitted)]


async def test_a_session_waits_through_a_hesitation_the_fixed_rule_cuts(make_speech_fixture) -> None:
    speech = make_speech_fixture([0.5, "turn on the, um", 0.9, "the kitchen light", 1.5], "eot-hesitation")
    fixed = await _turns_committed(speech, "silence")
    assert len(fixed) == 2  # cut after "um"
    (turn,) = await _turns_committed(speech, "smart-turn")  # one turn: the model heard the "um"
    assert turn.start < speech.segments[0][0] and turn.end >= speech.segments[1][1] - 0.1


@pytest.mark.slow
def test_bench_turns_reports_both_rules_side_by_side(capsys) -> None:
    import json

    from agent.bench.turns import main

    code = main(["--corpus", "espeak", "--pauses", "0.8", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["utterances"] == {"complete": 16, "filler": 6, "mid_sentence": 6}
    fixed, alone = result["rules"]["fixed 0.5 s"], result["rules"]["smart-turn"]
    assert fixed["premature_by_kind"]["filler"] == "6/6"  # 0.8 s > 0.5 s: the fixed rule cuts in
    assert alone["premature_by_kind"]["filler"] == "0/6"  # the model hears the "um"
    assert alone["model_calls"] > 0 and fixed["mean_wait_complete_s"] > 0.5
    assert result["detector"] == "smart-turn-prosody" and "smart-turn-prosody" in result["rules"]
    assert code == (0 if result["targets_met"] else 1)


class _Fixed:
    """A stand-in end-of-turn model: always the same P(complete), or a failure."""

    name = "fixed"

    def __init__(self, p: float | None) -> None:
        self.p = p
        self.clips = 0

    def predict(self, clips: list[np.ndarray]) -> np.ndarray:
        self.clips += len(clips)
        if self.p is None:
            raise RuntimeError("model failed")
        return np.full(len(clips), self.p)


@pytest.mark.parametrize(("p", "turns"), [(None, 2), (0.01, 1), (0.99, 2)])
async def test_a_session_follows_the_verdict_and_falls_back_to_the_fixed_rule(make_speech_fixture, p, turns) -> None:
    from agent import events as ev
    from agent.inference.scripted import ScriptedBackend
    from agent.runtime import AgentRuntime

    speech = make_speech_fixture([0.5, "turn on the, um", 0.9, "the kitchen light", 2.5], "eot-hesitation")
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=ScriptedBackend(default="ok"))
    await runtime.start()
    model = _Fixed(p)
    runtime.end_of_turn = service = EndOfTurnService(lambda: model)
    await service.start()
    session, sub = runtime.open_session()
    for i in range(0, speech.samples.size, 4096):
        await session.push_audio(speech.samples[i : i + 4096])
    await session.wait_idle()
    await runtime.close()
    await service.close()
    committed = []
    while not sub.queue.empty():
        if isinstance(event := sub.queue.get_nowait(), ev.TurnCommitted):
            committed.append(event)
    # failed: the fixed 0.5 s rule cuts at the 0.9 s pause; incomplete: waits (up to 2 s) through
    # it; complete: commits early, at the pause too.
    assert len(committed) == turns and model.clips >= 2
