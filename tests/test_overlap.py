"""The barge-in / backchannel / echo state machine, on a virtual clock (no audio, no asyncio)."""

from agent.speech.overlap import Kind, Overlap


def run(overlap: Overlap, until: float, busy: bool = True, echo: bool = False, step: float = 0.032) -> list[Kind]:
    seen, t = [], overlap.start or 0.0
    while t <= until:
        decided = overlap.step(t, busy, lambda: echo)
        if decided is not None:
            seen.append(decided)
        t += step
    return seen


def test_long_speech_over_the_answer_barges_in_once() -> None:
    o = Overlap(min_speech_s=0.3)
    o.speech_started(10.0, agent_busy=True)
    assert run(o, 10.25) == []  # not yet: could still be a backchannel
    assert run(o, 11.0) == [Kind.BARGE]  # once, however long it goes on
    assert o.turn_committed(split=False) is None  # the barge-in is a real turn


def test_a_backchannel_is_ignored_and_no_turn() -> None:
    o = Overlap(min_speech_s=0.3)
    o.speech_started(5.0, agent_busy=True)
    assert run(o, 5.2) == []
    o.speech_paused()
    assert run(o, 6.0) == []  # silence after it does not count as speech
    assert o.turn_committed(split=False) is Kind.UNDECIDED
    assert o.start is None


def test_the_agents_own_voice_is_echo_until_the_user_really_joins_in() -> None:
    o = Overlap(min_speech_s=0.3)
    o.speech_started(1.0, agent_busy=True)
    assert run(o, 2.0, echo=True) == [Kind.ECHO]  # reported once
    assert run(o, 3.0, echo=False) == [Kind.BARGE]  # louder than the echo: the user speaks


def test_echo_that_ends_is_ignored() -> None:
    o = Overlap(min_speech_s=0.3)
    o.speech_started(1.0, agent_busy=True)
    run(o, 2.0, echo=True)
    assert o.turn_committed(split=False) is Kind.ECHO


def test_speech_when_the_agent_is_quiet_or_finishes_is_an_ordinary_turn() -> None:
    o = Overlap(min_speech_s=0.3)
    o.speech_started(1.0, agent_busy=False)
    assert run(o, 2.0) == [] and o.turn_committed(split=False) is None
    o.speech_started(3.0, agent_busy=True)
    assert run(o, 4.0, busy=False) == []  # the answer ended meanwhile
    assert o.kind is Kind.TURN and o.turn_committed(split=False) is None


def test_a_split_turn_keeps_its_overlap_for_the_next_part() -> None:
    o = Overlap(min_speech_s=0.3)
    o.speech_started(1.0, agent_busy=True)
    assert o.turn_committed(split=True) is Kind.UNDECIDED and o.start == 1.0
    assert o.turn_committed(split=False) is Kind.UNDECIDED and o.start is None
