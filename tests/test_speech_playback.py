"""Playback of the agent's voice: 20 ms frames, what was heard at barge-in, pacing on a
virtual clock, and the aiortc track (on a virtual clock, then over a real loopback call)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from agent.speech.chunker import Piece
from agent.speech.playback import Pacer, PlaybackReport, Player
from agent.speech.stage import SpeechChunk

RATE = 24000


def tone(seconds: float, rate: int = RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def feed_piece(player: Player, index: int, text: str, seconds: float, rate: int = RATE, parts: int = 3) -> None:
    piece = Piece(text, text)
    for part in np.array_split(tone(seconds, rate), parts):
        player.feed(SpeechChunk(part, rate, piece, index))
    player.feed(SpeechChunk(np.zeros(0, np.int16), rate, piece, index, piece_end=True))


def recorder() -> tuple[list[Any], Callable[[Any], None]]:
    seen: list[Any] = []
    return seen, seen.append


def test_an_answer_plays_out_in_frames_and_reports_it_was_heard_in_full() -> None:
    started, on_started = recorder()
    done, on_done = recorder()
    player = Player(on_started=on_started, on_done=on_done)
    assert player.frame_samples == 960  # 20 ms at 48 kHz
    assert not player.next_frame().any() and not player.speaking  # idle: silence
    player.begin("turn-1")
    feed_piece(player, 0, "Hello there. ", 0.5)
    feed_piece(player, 1, "How are you?", 0.3)
    player.end()
    frames = [player.next_frame() for _ in range(60)]
    audible = [i for i, f in enumerate(frames) if np.abs(f).max() > 1000]
    assert audible[0] == 0 and 39 <= len(audible) <= 41  # 0.8 s = 40 frames
    assert started == ["turn-1"]
    assert len(done) == 1
    report: PlaybackReport = done[0]
    assert report.turn_id == "turn-1" and not report.interrupted
    assert report.spoken_text == "Hello there. How are you?"
    assert report.played_s == pytest.approx(0.8, abs=0.01) and report.flushed_s == 0
    assert not player.speaking and not frames[-1].any()
    assert player.underruns == 0


def test_barge_in_flushes_at_once_and_keeps_only_what_was_heard() -> None:
    done, on_done = recorder()
    player = Player(on_done=on_done)
    player.begin("turn-2")
    feed_piece(player, 0, "One two three four. ", 0.4)
    feed_piece(player, 1, "five six seven eight nine ten eleven twelve thirteen fourteen.", 1.0)
    player.end()
    for _ in range(45):  # 0.4 s of the first piece + 0.5 s of the second
        player.next_frame()
    assert player.speaking
    report = player.flush()
    assert report is not None and report.interrupted and done == [report]
    assert report.spoken_text == "One two three four. five six seven eight nine"
    assert report.played_s == pytest.approx(0.9, abs=0.01)
    assert report.flushed_s == pytest.approx(0.5, abs=0.01)
    assert not player.next_frame().any()  # the very next frame is silence
    feed_piece(player, 2, "Late audio of the cancelled answer.", 0.5)  # a stage still finishing
    assert not any(player.next_frame().any() for _ in range(30))
    assert player.flush() is None  # nothing left to flush
    assert player.flushed_samples == pytest.approx(0.5 * 48000, abs=100)


def test_barge_in_while_the_engine_is_still_speaking_a_piece() -> None:
    player = Player()
    player.begin("t")
    piece = Piece("alpha beta gamma delta", "alpha beta gamma delta")
    player.feed(SpeechChunk(tone(0.2), RATE, piece, 0))  # only the first part has been made
    for _ in range(5):
        player.next_frame()  # 0.1 s of the 0.2 s known so far
    assert player.flush().spoken_text == "alpha beta"  # type: ignore[union-attr]


def test_a_new_answer_replaces_one_still_playing() -> None:
    player = Player()
    player.begin("a")
    feed_piece(player, 0, "First answer here.", 1.0)
    player.next_frame()
    replaced = player.begin("b")
    assert replaced is not None and replaced.turn_id == "a" and replaced.interrupted
    assert not player.next_frame().any()


def test_gaps_while_the_engine_is_behind_are_counted() -> None:
    player = Player()
    player.begin("t")
    player.feed(SpeechChunk(tone(0.04, 48000), 48000, Piece("slow", "slow"), 0))
    frames = [player.next_frame() for _ in range(4)]
    assert [bool(f.any()) for f in frames] == [True, True, False, False]
    assert player.underruns == 2 and player.speaking  # not done: its end has not come


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 48000])
def test_engine_rates_are_resampled_to_48k_without_changing_pitch(rate: int) -> None:
    player = Player()
    player.begin("t")
    piece = Piece("x", "x")
    player.feed(SpeechChunk(tone(1.0, rate, hz=1000.0), rate, piece, 0))
    player.feed(SpeechChunk(np.zeros(0, np.int16), rate, piece, 0, piece_end=True))
    player.end()
    out = np.concatenate([player.next_frame() for _ in range(50)])
    spectrum = np.abs(np.fft.rfft(out.astype(np.float64)))
    assert np.fft.rfftfreq(out.size, 1 / 48000)[spectrum.argmax()] == pytest.approx(1000, abs=2)
    assert player.recent_output().size == 50 * 960  # what went out, for an echo gate


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_pacer_releases_one_frame_per_20ms_and_does_not_burst_after_a_stall() -> None:
    clock = VirtualClock()
    pacer = Pacer(0.02, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        await pacer.wait()
    assert clock.now == pytest.approx(0.98)  # the first frame goes at once
    assert clock.sleeps == pytest.approx([0.02] * 49)
    clock.now += 0.03  # the consumer is 10 ms late for a frame: it goes at once, no resync
    await pacer.wait()
    assert clock.now == pytest.approx(1.01) and pacer.resyncs == 0
    await pacer.wait()
    assert clock.now == pytest.approx(1.02)  # back on the 20 ms grid
    clock.now += 1.0  # a long stall (a blocked loop): restart from now, no burst of 50 frames
    await pacer.wait()
    await pacer.wait()
    assert pacer.resyncs == 1 and clock.sleeps[-1] == pytest.approx(0.02)


async def test_track_frames_are_20ms_at_48k_and_a_flush_silences_the_next_frame() -> None:
    pytest.importorskip("aiortc")
    from agent.speech.track import AgentAudioTrack

    clock = VirtualClock()
    waiting, release = asyncio.Event(), asyncio.Event()

    async def gated_sleep(seconds: float) -> None:  # lets the test act while recv() waits
        waiting.set()
        await release.wait()
        release.clear()
        await clock.sleep(seconds)

    player = Player()
    track = AgentAudioTrack(player, Pacer(player.frame_s, clock=clock, sleep=clock.sleep))
    idle = await track.recv()
    assert (idle.sample_rate, idle.samples, idle.format.name, idle.layout.name) == (48000, 960, "s16", "mono")
    assert not idle.to_ndarray().any()
    player.begin("t")
    feed_piece(player, 0, "one two three four five six seven eight nine ten", 1.0)
    frames = [await track.recv() for _ in range(10)]
    assert [f.pts for f in frames] == [960 * (i + 1) for i in range(10)]
    assert all(np.abs(f.to_ndarray()).max() > 1000 for f in frames)
    assert clock.now == pytest.approx(0.2)

    track.pacer.sleep = gated_sleep
    pending = asyncio.create_task(track.recv())
    await waiting.wait()  # recv() is waiting for the frame's time: the user barges in now
    report = player.flush()
    release.set()
    frame = await pending
    assert not frame.to_ndarray().any()  # playback stopped within one frame
    assert report is not None and report.spoken_text == "one two"  # 0.2 s of 1.0 s: 2 of 10 words
    track.stop()


async def test_a_real_peer_hears_the_agent_track(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("aiortc")
    from aiortc import RTCConfiguration, RTCPeerConnection

    from agent.speech.track import AgentAudioTrack
    from tests.rtc_util import loopback_only

    loopback_only(monkeypatch)
    player = Player()
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    sender.addTrack(AgentAudioTrack(player))
    received: asyncio.Queue[Any] = asyncio.Queue()
    receiver.on("track", received.put_nowait)
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        remote = await asyncio.wait_for(received.get(), 10)
        levels = []
        for _ in range(10):  # idle: the track sends silence
            levels.append(np.abs((await asyncio.wait_for(remote.recv(), 10)).to_ndarray()).max())
        assert max(levels) < 200
        player.begin("t")
        feed_piece(player, 0, "A tone stands in for speech.", 1.0, parts=10)
        player.end()
        loud = 0
        for _ in range(60):
            frame = await asyncio.wait_for(remote.recv(), 10)
            loud += int(np.abs(frame.to_ndarray()).max() > 3000)
        assert loud >= 30  # most of the second went through Opus and came out audible
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
async def test_deltas_to_frames_and_a_barge_in_keeps_a_prefix_of_the_answer() -> None:
    """The whole speech-out path as a session drives it: deltas → stage (espeak) → player → frames."""
    from agent.speech.base import TTSSettings
    from agent.speech.espeak import EspeakEngine
    from agent.speech.playback import play_answer
    from agent.speech.stage import SpeechStage

    answer = ("The kitchen light is now on, and the heating is set to twenty degrees. "
              "Tomorrow will be sunny, with a light wind from the west.")

    async def model() -> Any:
        for word in answer.split(" "):
            yield word + " "
            await asyncio.sleep(0)

    started, on_started = recorder()
    done, on_done = recorder()
    player = Player(on_started=on_started, on_done=on_done)
    async with EspeakEngine(TTSSettings(engine="espeak")) as engine:
        await play_answer(player, SpeechStage(engine, model()), "turn-1")  # speech is made faster than real time
        assert player.queued_s > 5  # the whole answer is queued, nothing played yet
        for _ in range(150):  # 3 s of playback
            player.next_frame()
        report = player.flush()
    assert started == ["turn-1"] and done == [report]
    assert report is not None and report.interrupted
    heard = report.spoken_text
    assert heard and answer.startswith(heard) and len(heard) < len(answer)
    assert heard.startswith("The kitchen light is now on,")  # the first clause takes well under 3 s
    assert not player.next_frame().any()
