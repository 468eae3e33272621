"""Any OpenAI-compatible `/v1/audio/speech` server (Kokoro-FastAPI, vLLM-served TTS, OpenAI), streamed.

The body is read as it arrives: raw 16-bit PCM (`response_format: pcm`, 24 kHz for
OpenAI's voices; `sample_rate` says otherwise) or a streamed WAV. Where the server lists
its voices (`GET /audio/voices`, as Kokoro-FastAPI does), the voice is checked at start.
Closing the generator closes the HTTP response.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal

import aiohttp
import numpy as np
from pydantic import Field

from agent.speech.base import EngineOptions, SpeechEngine, TTSError, WavStream


class OpenAISpeechOptions(EngineOptions):
    url: str = "http://127.0.0.1:8880/v1"  # the API base, as for the chat backend
    model: str = "tts-1"
    api_key: str | None = None
    response_format: Literal["pcm", "wav"] = "pcm"
    sample_rate: int = Field(default=24000, ge=8000, le=192000)  # of `pcm` bodies (a WAV says its own)
    check_voice: bool = True
    extra: dict[str, Any] = Field(default_factory=dict)  # server-specific request fields


def _voice_names(body: Any) -> set[str] | None:
    """Voice names from a voices listing: a list, or {"voices": [...]} of names or {id|name}."""
    items = body.get("voices") if isinstance(body, dict) else body
    if not isinstance(items, list):
        return None
    names: set[str] = set()
    for item in items:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, dict):
            names |= {str(item[k]) for k in ("id", "name", "voice_id") if k in item}
    return names


class OpenAISpeechEngine(SpeechEngine):
    name = "openai"
    Options = OpenAISpeechOptions
    options: OpenAISpeechOptions

    async def start(self) -> None:
        self.base = self.options.url.rstrip("/")
        self.voice = self.settings.voice or "alloy"
        headers = {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeout_s,
                                        sock_read=self.settings.timeout_s)
        self.http = aiohttp.ClientSession(headers=headers, timeout=timeout)
        self.sample_rate = self.options.sample_rate
        if self.options.check_voice:
            try:
                await self._check_voice()
            except BaseException:
                await self.http.close()
                raise

    async def _check_voice(self) -> None:
        try:
            async with self.http.get(f"{self.base}/audio/voices") as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except TimeoutError:
            return  # a slow listing proves nothing: the server will say so per request
        except aiohttp.ClientConnectionError as exc:
            raise TTSError("tts_unavailable", f"speech server {self.base}: {exc}") from None
        except (aiohttp.ClientError, ValueError):
            return  # no usable listing: the server will say so per request
        names = _voice_names(body)
        if names and self.voice not in names:
            raise TTSError("tts_unknown_voice", f"speech server has no voice {self.voice!r}; it lists "
                           f"{', '.join(sorted(names)[:20])}")

    async def aclose(self) -> None:
        if hasattr(self, "http"):
            await self.http.close()

    async def synthesize(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        body = {"model": self.options.model, "input": text, "voice": self.voice,
                "response_format": self.options.response_format, **self.options.extra}
        if self.settings.rate != 1.0:
            body["speed"] = self.settings.rate
        try:
            async with self.http.post(f"{self.base}/audio/speech", json=body) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    # 400/422: this input was refused (the next piece may pass); else the server failed
                    code = "tts_unspeakable" if resp.status in (400, 422) else "tts_failed"
                    raise TTSError(code, f"speech server answered {resp.status}: {detail}")
                wav = WavStream() if self.options.response_format == "wav" else None
                rest = b""
                async for data in resp.content.iter_any():
                    if wav is not None:
                        try:
                            pcm = wav.feed(data)
                        except ValueError as exc:
                            raise TTSError("tts_failed", f"speech server sent no WAV: {exc}") from None
                        self.sample_rate = wav.sample_rate or self.sample_rate
                    else:
                        data, rest = rest + data, b""
                        if len(data) % 2:
                            data, rest = data[:-1], data[-1:]
                        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
                    if pcm.size:
                        yield pcm
        except TimeoutError:  # aiohttp's ServerTimeoutError is one too: check it first
            raise TTSError("tts_timeout", f"speech server {self.base} sent nothing for "
                           f"{self.settings.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise TTSError("tts_failed", f"speech server {self.base}: {type(exc).__name__}: {exc}") from None
