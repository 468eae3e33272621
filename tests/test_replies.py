"""A session's replies end to end (scripted backend, real espeak-ng speech): the two bugs of
issue 27. (a) The preemptive start and the commit in one `push_audio` call — what the audio
feeder does under load — must still play the answer. (b) A close at any await of the commit
path: nothing is emitted after `session.ended`, nothing reaches the backend after `forget`,
and no task of the session outlives it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent import events as ev
from agent.config import load_settings
from agent.context import AgentHooks
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.speech.base import TTSSettings
from tests.test_preempt import ANSWER, _drain, _feed, _runtime

SR = 16000


async def test_the_preemptive_start_and_the_commit_in_one_push_still_play_the_answer(make_speech_fixture) -> None:
    speech = make_speech_fixture([0.5, "turn on the kitchen light", 1.0], "preempt-commit")
    backend = ScriptedBackend([ANSWER], chunk=4)
    runtime = await _runtime(backend, tts=True)
    try:
        session, sub = runtime.open_session(voice_output="live")
        voice = session.voice
        assert voice is not None
        await session.push_audio(speech.samples)  # the whole utterance and its silence at once
        assert len(backend.promoted) == 1  # started and committed within that call
        audible = 0
        for _ in range(300):  # up to 6 s of 20 ms frames, pulled as a transport does
            audible += bool(np.any(voice.player.next_frame()))
            if audible and not voice.active:
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(session.wait_idle(), 10)
        events = _drain(sub)
    finally:
        await runtime.close()
    assert [r.preemptive for r in backend.requests] == [True]  # one answer: the preemptive one
    assert audible > 10, "the answer was synthesized but never played"
    kinds = [e.type for e in events]
    assert "response.audio.started" in kinds and "response.audio.done" in kinds, kinds
    (done,) = [e for e in events if isinstance(e, ev.ResponseAudioDone)]
    assert not done.interrupted and done.duration_s > 0.5 and done.spoken_text.strip() == ANSWER
    assert "".join(e.text for e in events if isinstance(e, ev.ResponseDelta)) == ANSWER


class Recording(ScriptedBackend):
    """Records the order of the calls the session makes; at the call named `close_at` it closes
    the session from another task (a client's `session.close`, a transport going away) and
    waits until that close is over before it goes on."""

    def __init__(self, *args, close_at: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []
        self.close_at = close_at
        self.session = None

    async def closing(self, name: str) -> None:
        self.calls.append(name)
        if name == self.close_at and self.session is not None:
            self.close_at = ""
            closer = asyncio.create_task(self.session.close("client"))
            await asyncio.wait({closer})

    async def prefill(self, request) -> None:
        await self.closing("prefill")
        await super().prefill(request)

    async def promote(self, session_id: str, turn_id: str) -> None:
        await self.closing("promote")
        await super().promote(session_id, turn_id)

    async def drop(self, session_id: str, turn_id: str) -> None:
        await self.closing("drop")
        await super().drop(session_id, turn_id)

    async def forget(self, session_id: str) -> None:
        self.calls.append("forget")
        await super().forget(session_id)

    async def generate(self, request, stats=None):
        await self.closing("generate:preemptive" if request.preemptive else "generate:committed")
        async for delta in super().generate(request, stats):
            yield delta


class ClosingHook(AgentHooks):
    """Closes its session while the user's turn is being committed (the `on_user_turn` await)."""

    def __init__(self, backend: Recording) -> None:
        self.backend = backend

    async def on_user_turn(self, ctx, turn):
        await self.backend.closing("on_user_turn")
        return None


@pytest.mark.parametrize(("close_at", "preemptive", "tts"), [
    ("prefill", True, False),
    ("generate:preemptive", True, True),
    ("on_user_turn", True, True),
    ("promote", True, True),
    ("on_user_turn", False, False),
    ("generate:committed", False, True),
])
async def test_a_close_anywhere_in_the_commit_path_ends_everything(make_speech_fixture, close_at, preemptive,
                                                                   tts) -> None:
    speech = make_speech_fixture([0.5, "turn on the kitchen light", 1.0], "preempt-commit")
    backend = Recording([ANSWER], chunk=4, close_at=close_at)
    agent = ClosingHook(backend)
    settings = load_settings(None, model="tiny-random", turns={"preemptive": preemptive},
                             tts=TTSSettings(engine="espeak") if tts else None)
    runtime = AgentRuntime(settings, backend=backend, hooks=agent)
    await runtime.start()
    try:
        session, sub = runtime.open_session(voice_output="live" if tts else "none")
        backend.session = session
        await _feed(session, speech.samples)
        await asyncio.wait_for(session.wait_idle(), 10)
        await asyncio.sleep(0.3)  # anything left running would speak now
        events = _drain(sub)
        leftover = [t for t in asyncio.all_tasks() if session.id in t.get_name() and not t.done()]
    finally:
        await runtime.close()
    assert session.closed and close_at in backend.calls  # the close came where it was meant to
    kinds = [e.type for e in events]
    assert kinds.count("session.ended") == 1
    after = kinds[kinds.index("session.ended") + 1:]
    assert after == [], f"emitted after session.ended: {after} ({kinds})"
    forgotten = backend.calls.index("forget")
    late = [c for c in backend.calls[forgotten + 1:] if c in ("prefill", "promote", "drop") or c.startswith("generate")]
    assert late == [], f"the backend was asked after forget: {backend.calls}"
    assert leftover == [], leftover
