"""Real speech through the batched VAD service and the turn detector."""

import asyncio
import random

import numpy as np
import pytest

from agent.audio import SAMPLE_RATE
from agent.turns import SpeechStarted, SpeechStopped, TurnCommitted, TurnDetector
from agent.vad import VADService
from tests.speech import make_speech

CHUNK = 512


async def detect(service: VADService, samples: np.ndarray, piece: int = 4000, delays: bool = False):
    """Run one stream through the shared service, as a session does; returns its signals."""
    stream = service.open_stream()
    det = TurnDetector()
    signals = []
    done = 0
    try:
        for i in range(0, samples.size, piece):
            if delays:
                await asyncio.sleep(random.random() * 0.002)
            probs = await stream.process(samples[i : i + piece])
            for p in probs:
                signals += det.feed(samples[done : done + CHUNK], float(p))
                done += CHUNK
        signals += det.flush()
    finally:
        stream.close()
    return signals


@pytest.fixture(scope="module")
async def vad():
    service = VADService()
    await service.start()
    yield service
    await service.close()


def turns_of(signals):
    return [s for s in signals if isinstance(s, TurnCommitted)]


async def test_two_utterances_give_two_turns_with_true_boundaries(vad, speech_two):
    signals = await detect(vad, speech_two.samples)
    turns = turns_of(signals)
    assert len(turns) == 2
    starts = [s.t for s in signals if isinstance(s, SpeechStarted)]
    stops = [s.t for s in signals if isinstance(s, SpeechStopped)]
    for (true_start, true_end), start, stop, turn in zip(speech_two.segments, starts, stops, turns):
        assert abs(start - true_start) <= 0.3 and abs(stop - true_end) <= 0.3
        assert abs(turn.start - true_start) <= 0.3 and abs(turn.end - true_end) <= 0.3
        # sample-exact: the turn's audio is exactly the input between its boundaries
        a = int(round(turn.start * SAMPLE_RATE))
        np.testing.assert_array_equal(turn.audio, speech_two.samples[a : a + turn.audio.size])
        assert turn.audio.size == int(round((turn.end - turn.start) * SAMPLE_RATE))


async def test_short_pause_inside_an_utterance_stays_one_turn(vad):
    speech = make_speech([0.8, "please turn on", 0.2, "the kitchen light", 1.0], "pause")
    assert len(turns_of(await detect(vad, speech.samples))) == 1


async def test_forty_seconds_of_speech_split_into_turns_of_at_most_30s(vad):
    sentence = "the quick brown fox jumps over the lazy dog and keeps on running across the wide green field"
    parts: list = [0.5]
    for _ in range(8):
        parts += [sentence, 0.05]
    speech = make_speech(parts + [1.0], "long")
    assert speech.segments[-1][1] - speech.segments[0][0] > 40
    turns = turns_of(await detect(vad, speech.samples))
    assert len(turns) >= 2
    assert all(t.end - t.start <= 30.0 + 1e-9 for t in turns)
    # together they cover the speech from its first word to its last
    assert turns[0].start <= speech.segments[0][0] + 0.3
    assert turns[-1].end >= speech.segments[-1][1] - 0.3
    covered = sum(t.end - t.start for t in turns)
    assert covered >= (speech.segments[-1][1] - speech.segments[0][0]) * 0.95


async def test_silence_and_noise_give_no_turn(vad):
    silence = np.zeros(5 * SAMPLE_RATE, np.float32)
    noise = np.random.default_rng(0).normal(0, 0.05, 5 * SAMPLE_RATE).astype(np.float32)
    assert turns_of(await detect(vad, silence)) == []
    assert turns_of(await detect(vad, noise)) == []


async def test_64_streams_joining_and_leaving_get_the_turns_they_get_alone(vad, speech_two):
    rng = random.Random(7)
    variants = []
    for i in range(64):
        lead = np.zeros(rng.randrange(0, 3 * SAMPLE_RATE), np.float32)
        variants.append(np.concatenate([lead, speech_two.samples]))
    alone = [turns_of(await detect(vad, v)) for v in variants[:8]]

    async def late(i: int):
        await asyncio.sleep(rng.random() * 0.2)  # join at random moments
        return turns_of(await detect(vad, variants[i], piece=rng.choice([512, 1000, 4000]), delays=True))

    together = await asyncio.gather(*(late(i) for i in range(64)))
    for i in range(8):
        assert [(t.start, t.end) for t in together[i]] == [(t.start, t.end) for t in alone[i]]
    assert all(len(t) == 2 for t in together)
