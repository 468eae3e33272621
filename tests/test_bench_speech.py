"""The one espeak helper and the one paced track that benchmarks and tests share (issue 27, item 5)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.bench.speech import RATE, VOICED, available, espeak, utterance, write_wav

needs_espeak = pytest.mark.skipif(not available(), reason="needs espeak-ng and sox")


@needs_espeak
def test_espeak_speech_is_16k_trimmed_and_cached(tmp_path: Path) -> None:
    trimmed = espeak("turn on the light", cache=tmp_path)
    assert trimmed.dtype == np.float32 and 0.5 < trimmed.size / RATE < 2.5
    assert abs(trimmed[0]) > VOICED and abs(trimmed[-1]) > VOICED  # espeak's padding is gone
    padded = espeak("turn on the light", cache=tmp_path, trim=False)
    assert padded.size > trimmed.size
    made = list(tmp_path.glob("espeak-*.wav"))
    assert len(made) == 1  # one text, one voice, one speed: made once
    stamp = made[0].stat().st_mtime_ns
    espeak("turn on the light", cache=tmp_path)
    assert made[0].stat().st_mtime_ns == stamp
    espeak("turn on the light", speed=200, cache=tmp_path)
    assert len(list(tmp_path.glob("espeak-*.wav"))) == 2


@needs_espeak
def test_an_utterance_knows_where_its_speech_is(tmp_path: Path) -> None:
    samples, spoken = utterance([0.5, "hello", 0.25, "kitchen light", 1.0], cache=tmp_path)
    assert len(spoken) == 2 and spoken[0][0] == pytest.approx(0.5)
    assert spoken[1][0] == pytest.approx(spoken[0][1] + 0.25, abs=1 / RATE)
    assert samples.size / RATE == pytest.approx(spoken[1][1] + 1.0, abs=1 / RATE)
    assert not np.any(samples[: int(0.5 * RATE)])
    path = write_wav(tmp_path / "u.wav", samples)
    from agent.audio import read_file

    assert np.allclose(read_file(path), samples, atol=1e-4)


def _frames(track: object, n: int) -> list[np.ndarray]:
    async def pull() -> list[np.ndarray]:
        return [(await track.recv()).to_ndarray().reshape(-1) for _ in range(n)]  # type: ignore[attr-defined]

    return asyncio.run(pull())


def test_the_paced_track_plays_its_buffer_then_silence() -> None:
    from agent.bench.track import PacedTrack

    pcm = np.arange(1, 501, dtype=np.int16)  # 500 samples: one frame and a bit
    track = PacedTrack(pcm, speed=1000.0)
    frames = _frames(track, 3)
    assert [f.size for f in frames] == [320, 320, 320]
    assert np.array_equal(frames[0], pcm[:320]) and np.array_equal(frames[1][:180], pcm[320:])
    assert not frames[1][180:].any() and not frames[2].any()
    assert track.finished and track.first_frame.is_set() and len(track.sent) == 3


def test_a_looped_track_starts_at_its_offset_and_wraps() -> None:
    from agent.bench.track import PacedTrack

    pcm = np.arange(1, 1001, dtype=np.int16)
    frames = _frames(PacedTrack(pcm, loop=True, offset=900, speed=1000.0), 2)
    assert np.array_equal(frames[0][:100], pcm[900:]) and not frames[0][100:].any()  # the end of a loop
    assert np.array_equal(frames[1], pcm[220:540])  # (320 + 900) % 1000


def test_a_played_clip_goes_over_silence_with_its_times() -> None:
    from agent.bench.track import PacedTrack

    async def run() -> tuple[list[np.ndarray], float, float]:
        track = PacedTrack(speed=1000.0, clock_at_first_frame=False)
        silent = (await track.recv()).to_ndarray().reshape(-1)
        started, ended = track.play(np.full(400, 0.5, np.float32))
        frames = [silent] + [(await track.recv()).to_ndarray().reshape(-1) for _ in range(3)]
        return frames, await started, await ended

    frames, started, ended = asyncio.run(run())
    assert not frames[0].any() and (frames[1] == 16383).all()
    assert (frames[2][:80] == 16383).all() and not frames[2][80:].any() and not frames[3].any()
    assert ended > started
