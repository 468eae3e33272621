"""`Voice`, one session's speech out, on its own: deltas → stage → player → events, offline
(rendered at once) and live (frames pulled by hand, as a transport's clock would), a cut
keeps what was heard, a new answer supersedes one still playing, the self-echo test, errors,
and the process totals for /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
import pytest

from agent import events as ev
from agent.speech.base import SpeechEngine, TTSSettings
from agent.speech.voice import Voice, VoiceCounters, voiced_rms

RATE = 16000
CHAR_S = 0.01  # the engine speaks 10 ms per character


class ToneEngine(SpeechEngine):
    """A 300 Hz tone, 10 ms per character; "CRASH" raises."""

    name = "tone"

    def __init__(self) -> None:
        super().__init__(TTSSettings(timeout_s=1.0))
        self.sample_rate = RATE

    async def synthesize(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        if "CRASH" in text:
            raise RuntimeError("vocoder on fire")
        t = np.arange(round(len(text) * CHAR_S * RATE)) / RATE
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
        for part in np.array_split(pcm, 4):
            yield part
            await asyncio.sleep(0)


def make(realtime: bool, counters: VoiceCounters | None = None) -> tuple[Voice, list[Any], list[Any]]:
    seen: list[Any] = []
    audio: list[Any] = []
    voice = Voice(ToneEngine(), seen.append, realtime=realtime, counters=counters,
                  on_audio=lambda turn_id, pcm, rate: audio.append((turn_id, pcm, rate)))
    return voice, seen, audio


def kinds(seen: list[Any]) -> list[str]:
    return [e.type for e in seen]


def say(voice: Voice, turn_id: str, *deltas: str) -> None:
    voice.begin(turn_id)
    for delta in deltas:
        voice.say(delta)
    voice.end()


async def until_queued(voice: Voice, seconds: float) -> None:
    for _ in range(1000):
        if voice.player.queued_s >= seconds:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {voice.player.queued_s} s queued")


async def frames(voice: Voice, n: int) -> list[np.ndarray]:
    """Pull n frames, as a transport's 20 ms clock would (with time for the stage between)."""
    out = []
    for _ in range(n):
        out.append(voice.player.next_frame())
        await asyncio.sleep(0)
    return out


TEXT = "Sure, the kitchen light is on now. Anything else?"


async def test_offline_renders_each_answer_at_once_with_its_events_and_audio() -> None:
    voice, seen, audio = make(realtime=False)
    assert voice.player.sample_rate == RATE  # offline: the engine's own rate, no resampling
    say(voice, "t1", "Sure, the kitchen ", "light is on now. Any", "thing else?")
    assert voice.active
    await asyncio.wait_for(voice.wait_idle(), 5)
    assert not voice.active
    assert kinds(seen) == ["response.audio.started", "response.audio.done"]
    done = seen[1]
    assert done.turn_id == "t1" and done.spoken_text == TEXT and not done.interrupted
    spoken_chars = len("Sure, the kitchen light is on now.") + len("Anything else?")
    assert done.duration_s == pytest.approx(spoken_chars * CHAR_S, abs=0.021)
    assert {"tts_first_audio_s", "tts_rtf", "tts_audio_s"} <= set(done.timings)
    ((turn_id, pcm, rate),) = audio
    assert (turn_id, rate) == ("t1", RATE) and pcm.size == round(done.duration_s * RATE)
    assert np.abs(pcm).max() > 5000
    assert voice.counters.answers == 1 and voice.counters.played_s == pytest.approx(done.duration_s)


async def test_live_a_cut_flushes_at_once_and_keeps_what_was_heard() -> None:
    counters = VoiceCounters()
    voice, seen, audio = make(realtime=True, counters=counters)
    assert voice.player.sample_rate == 48000 and voice.player.frame_samples == 960
    assert not voice.is_echo(np.full(1600, 0.1, np.float32))  # nothing playing: no echo
    say(voice, "t1", "One two three four five six seven eight nine ten. ", "Eleven twelve thirteen fourteen.")
    await until_queued(voice, 0.5)
    heard = await frames(voice, 20)  # 0.4 s of the first piece (0.51 s)
    assert all(np.abs(f).max() > 5000 for f in heard[1:])
    assert kinds(seen) == ["response.audio.started"] and voice.player.speaking
    report = voice.interrupt()  # a barge-in
    assert report is not None and report.interrupted
    assert report.spoken_text and "One two three four five six seven eight nine ten.".startswith(report.spoken_text)
    assert not voice.active and not voice.player.next_frame().any()  # silence from the next frame on
    assert kinds(seen) == ["response.audio.started", "response.audio.done"]
    assert seen[1].interrupted and seen[1].spoken_text == report.spoken_text
    assert audio == []  # live: nothing is written
    assert counters.interrupted == 1 and counters.flushed_s > 0.05 and counters.played_s == pytest.approx(0.4, abs=0.03)
    assert voice.interrupt() is None  # nothing left to cut
    await voice.close()


async def test_a_new_answer_supersedes_one_still_playing() -> None:
    voice, seen, _ = make(realtime=True)
    say(voice, "t1", "A first answer that goes on for a good while. ")
    await until_queued(voice, 0.2)
    await frames(voice, 5)
    say(voice, "t2", "The second one.")
    assert [(e.type, e.turn_id) for e in seen] == [("response.audio.started", "t1"), ("response.audio.done", "t1")]
    assert seen[1].interrupted
    await until_queued(voice, 0.1)
    await frames(voice, 60)
    assert [(e.type, e.turn_id) for e in seen[2:]] == [("response.audio.started", "t2"), ("response.audio.done", "t2")]
    assert not seen[3].interrupted and seen[3].spoken_text == "The second one."
    assert not voice.active
    await voice.close()


async def test_its_own_voice_is_echo_a_louder_voice_is_not() -> None:
    voice, _, _ = make(realtime=True)
    say(voice, "t1", "A long answer, long enough to be talked over by someone in the room. ")
    await until_queued(voice, 0.6)
    await frames(voice, 30)
    out = voice.player.recent_output()[-24000:].astype(np.float32) / 32768  # the last 0.5 s at 48 kHz
    mic = out[::3]  # what a microphone at 16 kHz hears of the loudspeaker, in step
    assert voice.is_echo(mic * 10 ** (-12 / 20))  # 12 dB down: the room's echo of our voice
    assert not voice.is_echo(mic * 1.0)  # as loud as we are: someone talking over us
    pauses = np.zeros_like(mic)
    pauses[: mic.size // 2] = mic[: mic.size // 2] * 10 ** (-12 / 20)
    assert voice.is_echo(pauses)  # pauses do not dilute the echo's level
    assert voiced_rms(pauses, 320) == pytest.approx(voiced_rms(mic[: mic.size // 2], 320) * 10 ** (-12 / 20), rel=0.05)
    await voice.close()
    # nothing is sent any more, but the far end still plays its buffers: echo for the playout margin
    assert voice.is_echo(mic * 10 ** (-12 / 20))
    await frames(voice, round(voice.playout_margin_s / 0.02) + 1)
    assert not voice.is_echo(mic * 10 ** (-12 / 20))  # past it: nothing playing any more


async def test_a_failing_engine_is_an_error_event_for_the_turn() -> None:
    voice, seen, _ = make(realtime=False)
    say(voice, "t9", "This part is fine to say. ", "But CRASH goes this one. And this.")
    await asyncio.wait_for(voice.wait_idle(), 5)
    errors = [e for e in seen if isinstance(e, ev.Error)]
    assert [(e.code, e.turn_id) for e in errors] == [("tts_failed", "t9")] and "vocoder on fire" in errors[0].message
    done = [e for e in seen if isinstance(e, ev.ResponseAudioDone)]
    assert len(done) == 1 and done[0].spoken_text == "This part is fine to say."
    voice.say("late text")  # after end(): ignored, no new answer
    assert not voice.active


async def test_totals_are_shared_by_every_voice_of_a_process() -> None:
    counters = VoiceCounters()
    a, _, _ = make(realtime=False, counters=counters)
    b, _, _ = make(realtime=False, counters=counters)
    a.note_echo()
    b.note_echo()
    b.note_backchannel()
    assert (a.echo_gated, b.echo_gated, b.backchannels) == (1, 1, 1)
    assert (counters.echo_gated, counters.backchannels) == (2, 1)
    say(a, "a1", "Hello there, you.")
    say(b, "b1", "Hi.")
    await asyncio.gather(a.wait_idle(), b.wait_idle())
    assert counters.answers == 2 and counters.interrupted == 0 and counters.underruns == 0
