"""A local stand-in for vLLM's OpenAI-compatible chat-completions endpoint.

It checks each request the way the real server would need it (model name, message shapes,
`input_audio` parts holding base64 16 kHz mono 16-bit WAV, `stream: true`), records the
request with its decoded audio, and streams scripted SSE deltas. A request it cannot accept
gets vLLM's 400 error shape and is listed in `rejected`, so tests see what was wrong.

Knobs (plain attributes, change them between requests): `pieces`, `status` (fail with that
HTTP status), `stall_after` (stop after that many pieces and keep the stream open until the
client leaves), `usage` (send a usage chunk), `error_after` (an error chunk mid-stream),
`end_after` (end the HTTP response after that many pieces, without finish or [DONE]),
`max_model_len` (shown by `GET /v1/models`, as vLLM does), `max_audios` (vLLM's
`--limit-mm-per-prompt`: more clips in one request get its 400), `down` (every endpoint 503s).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import wave
from typing import Any

import numpy as np
from aiohttp import web

MODEL = "Qwen/Qwen2-Audio-7B-Instruct"


class BadRequest(Exception):
    pass


class UnknownModel(BadRequest):
    """vLLM answers it with 404 NotFoundError."""


def decode_wav(data: str) -> np.ndarray:
    """base64 WAV → float32 samples; BadRequest unless 16 kHz mono 16-bit PCM."""
    try:
        raw = base64.b64decode(data, validate=True)
        with wave.open(io.BytesIO(raw)) as w:
            shape = (w.getframerate(), w.getnchannels(), w.getsampwidth())
            frames = w.readframes(w.getnframes())
    except (binascii.Error, wave.Error, EOFError) as exc:
        raise BadRequest(f"input_audio is not base64 WAV: {exc}") from None
    if shape != (16000, 1, 2):
        raise BadRequest(f"input_audio must be 16 kHz mono 16-bit, got rate/channels/width {shape}")
    return np.frombuffer(frames, "<i2").astype(np.float32) / 32767.0


class FakeOpenAI:
    def __init__(self, pieces: tuple[str, ...] = ("Hel", "lo", " there"), model: str = MODEL) -> None:
        self.pieces = list(pieces)
        self.model = model
        self.status = 200
        self.error_message = "model is overloaded"
        self.stall_after: int | None = None
        self.error_after: int | None = None
        self.end_after: int | None = None
        self.usage = True
        self.max_model_len: int | None = 4096
        self.max_audios: int | None = None
        self.down = False
        self.requests: list[dict[str, Any]] = []  # accepted bodies
        self.audios: list[list[np.ndarray]] = []  # decoded audio of each accepted request
        self.headers: list[dict[str, str]] = []
        self.rejected: list[str] = []
        self.disconnected = asyncio.Event()  # a client left mid-stream
        self.completed = 0  # streams sent through to [DONE]
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)  # vLLM takes long audio; 1 MB default would not
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)  # port 0: a free one
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- the endpoint -------------------------------------------------------------
    def _validate(self, body: Any) -> list[np.ndarray]:
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        if body.get("model") != self.model:
            raise UnknownModel(f"The model `{body.get('model')}` does not exist.")
        if body.get("stream") is not True:
            raise BadRequest("this server only answers stream=true")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        audios: list[np.ndarray] = []
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise BadRequest(f"bad role {m.get('role')!r}")
            content = m.get("content")
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise BadRequest("content must be a string or a list of parts")
            for part in content:
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    continue
                if part.get("type") == "input_audio" and part.get("input_audio", {}).get("format") == "wav":
                    audios.append(decode_wav(part["input_audio"].get("data", "")))
                    continue
                raise BadRequest(f"unsupported content part {json.dumps(part)[:200]}")
        return audios

    async def _models(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"error": {"message": "down"}}, status=503)
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "root": self.model, "max_model_len": self.max_model_len}]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return web.json_response({"error": {"message": "down"}}, status=503)
        try:
            body = await request.json()
            audios = self._validate(body)
            if self.max_audios is not None and len(audios) > self.max_audios:
                raise BadRequest(f"At most {self.max_audios} audio(s) may be provided in one prompt.")
        except (BadRequest, json.JSONDecodeError) as exc:
            self.rejected.append(str(exc))
            status = 404 if isinstance(exc, UnknownModel) else 400
            return web.json_response({"error": {"message": str(exc), "code": status}}, status=status)
        self.requests.append(body)
        self.audios.append(audios)
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.json_response({"error": {"message": self.error_message, "code": self.status}},
                                     status=self.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(self.pieces):
                if i == self.stall_after:
                    while True:  # an SSE comment per tick: the write fails once the client left
                        await resp.write(b": still thinking\n\n")
                        await asyncio.sleep(0.02)
                if i == self.end_after:
                    return resp
                if i == self.error_after:
                    await _event(resp, {"error": {"message": "engine crashed", "code": 500}})
                    return resp
                last = i == len(self.pieces) - 1
                await _event(resp, {"id": "c1", "object": "chat.completion.chunk", "model": self.model,
                                    "choices": [{"index": 0, "delta": {"content": piece},
                                                 "finish_reason": "stop" if last else None}]})
            if self.usage:
                await _event(resp, {"choices": [], "usage": {"prompt_tokens": 42,
                                                             "completion_tokens": len(self.pieces)}})
            await resp.write(b"data: [DONE]\n\n")
            self.completed += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


async def _event(resp: web.StreamResponse, payload: dict[str, Any]) -> None:
    await resp.write(f"data: {json.dumps(payload)}\n\n".encode())
