"""Audio in the one format the pipeline uses: 16 kHz mono float32 in [-1, 1].

Everything else (any rate, channel count, sample format, container) is converted with
PyAV's resampler, the same code path for files, WebRTC and LiveKit frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE

__all__ = ["SAMPLE_RATE", "AudioFileError", "Resampler", "read_file"]


class AudioFileError(Exception):
    """A file that cannot be read as audio; the message names the file."""


class Resampler:
    """Streaming converter from PyAV frames of any layout to 16 kHz mono float32.

    Channels are averaged here rather than by FFmpeg's downmix, which adds them at -3 dB
    each: identical left/right channels (what browsers send) would come out 1.4× louder
    and clip.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._layout: str | None = None

    def convert(self, frame: av.AudioFrame | None) -> np.ndarray:
        """Convert one frame; `None` flushes what the resampler still holds."""
        if frame is not None and frame.layout.name != self._layout:
            head = self.convert(None) if self._resampler is not None else np.zeros(0, np.float32)
            self._layout = frame.layout.name
            self._resampler = av.AudioResampler(format="fltp", layout=self._layout, rate=SAMPLE_RATE)
            return np.concatenate([head, self._convert(frame)])
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._convert(frame)

    def _convert(self, frame: av.AudioFrame | None) -> np.ndarray:
        assert self._resampler is not None
        out = [f.to_ndarray().mean(axis=0) for f in self._resampler.resample(frame)]
        if not out:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def frame_from_pcm(pcm: np.ndarray, sample_rate: int, layout: str = "mono") -> av.AudioFrame:
    """Wrap interleaved PCM (int16, uint8, float32 …) in a PyAV frame for conversion."""
    formats = {np.dtype(np.int16): "s16", np.dtype(np.uint8): "u8", np.dtype(np.int32): "s32",
               np.dtype(np.float32): "flt", np.dtype(np.float64): "dbl"}
    fmt = formats.get(pcm.dtype)
    if fmt is None:
        raise ValueError(f"unsupported sample dtype {pcm.dtype}")
    channels = av.AudioLayout(layout).nb_channels
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format=fmt, layout=layout)
    frame.sample_rate = sample_rate
    assert frame.samples * channels == pcm.size
    return frame


def to_mono16k(pcm: np.ndarray, sample_rate: int, layout: str = "mono") -> np.ndarray:
    """Convert a whole interleaved PCM buffer to 16 kHz mono float32."""
    resampler = Resampler()
    head = resampler.convert(frame_from_pcm(pcm, sample_rate, layout))
    return np.concatenate([head, resampler.convert(None)])


def iter_file(path: str | Path, chunk_samples: int = 16000) -> Iterator[np.ndarray]:
    """Decode any file PyAV can read into 16 kHz mono float32 chunks.

    Raises AudioFileError (naming the file) for a missing, empty, truncated or
    non-audio file.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioFileError(f"{path}: is a directory")
    if not path.is_file():
        raise AudioFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioFileError(f"{path}: file is empty")
    resampler = Resampler()
    pending: list[np.ndarray] = []
    pending_len = 0
    total = 0
    expected: float | None = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioFileError(f"{path}: contains no audio stream")
            stream = container.streams.audio[0]
            expected = _wav_header_seconds(path)
            for frame in container.decode(stream):
                pcm = resampler.convert(frame)
                pending.append(pcm)
                pending_len += pcm.size
                while pending_len >= chunk_samples:
                    buf = np.concatenate(pending)
                    yield buf[:chunk_samples]
                    total += chunk_samples
                    pending, pending_len = [buf[chunk_samples:]], buf.size - chunk_samples
    except AudioFileError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioFileError(f"{path}: cannot decode audio ({_reason(exc)})") from None
    tail = np.concatenate(pending + [resampler.convert(None)])
    if tail.size:
        yield tail
    decoded = total + tail.size
    if decoded == 0:
        raise AudioFileError(f"{path}: no audio samples decoded (empty or truncated)")
    if expected is not None and decoded / SAMPLE_RATE < expected - 0.1:
        # Decoders stop quietly at a cut-off end; the header knows how long it should be.
        raise AudioFileError(f"{path}: truncated: header says {expected:.2f} s, "
                             f"only {decoded / SAMPLE_RATE:.2f} s could be decoded")


def _reason(exc: Exception) -> str:
    """FFmpeg's and the OS's own words, without the errno and file name around them."""
    strerror = getattr(exc, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(exc)
    return text[:1].lower() + text[1:]


def _wav_header_seconds(path: Path) -> float | None:
    """Length a PCM WAV header declares (FFmpeg estimates it from the file size instead,
    so a cut-off WAV would otherwise decode quietly short)."""
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError, OSError, ZeroDivisionError):
        return None


def read_file(path: str | Path) -> np.ndarray:
    """The whole file as one 16 kHz mono float32 array."""
    return np.concatenate(list(iter_file(path)))
