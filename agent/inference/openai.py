"""Backend for any OpenAI-compatible chat-completions server that serves Qwen2-Audio.

This is how users scale past one machine: vLLM replicas (or tensor parallel) behind it,
the agent processes stateless per session.

    vllm serve Qwen/Qwen2-Audio-7B-Instruct --limit-mm-per-prompt '{"audio": 5}'
    voice-agent serve --backend openai --openai-url http://127.0.0.1:8000/v1

Audio goes as `input_audio` parts (base64 16 kHz WAV); the reply streams as SSE.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, AsyncIterator

import aiohttp

from agent.audio import to_wav_bytes
from agent.inference.base import GenerationRequest, GenerationStats, InferenceError


def to_openai_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """Our messages → chat-completions messages, audio parts inlined as base64 WAV."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] == "audio":
                wav = to_wav_bytes(request.audios[part["audio"]])
                parts.append({"type": "input_audio",
                              "input_audio": {"data": base64.b64encode(wav).decode("ascii"), "format": "wav"}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


class OpenAIBackend:
    name = "openai"
    warning: str | None = None

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._http: aiohttp.ClientSession | None = None

    @property
    def queue_depth(self) -> int:
        return 0  # the server queues; we hold nothing

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._http = aiohttp.ClientSession(headers=headers, timeout=self._timeout)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncIterator[str]:
        if self._http is None:
            raise InferenceError("backend_unavailable", "OpenAI backend not started")
        if not request.audios:
            raise InferenceError("bad_request", "empty turn: no audio")
        url = f"{self.base_url}/chat/completions"
        body = {"model": self.model_name, "messages": to_openai_messages(request), "stream": True,
                "max_tokens": request.max_new_tokens, "temperature": 0.0,
                "stream_options": {"include_usage": True}}
        start = time.monotonic()
        deltas = 0
        try:
            # Leaving this block early (cancel, aclose) closes the response: the server sees
            # the client go and stops generating.
            async with self._http.post(url, json=body) as response:
                if response.status in (429, 503):
                    raise InferenceError("busy", f"{url}: HTTP {response.status}: {await _reason(response)}")
                if response.status >= 400:
                    raise InferenceError("backend_error", f"{url}: HTTP {response.status}: {await _reason(response)}")
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if stats is not None and chunk.get("usage"):
                        stats.tokens = int(chunk["usage"].get("completion_tokens") or deltas)
                        stats.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if deltas == 0 and stats is not None:
                                stats.timings["ttft"] = time.monotonic() - start
                            deltas += 1
                            yield text
        except aiohttp.ClientConnectionError as exc:
            raise InferenceError("backend_unavailable", f"cannot reach {url}: {exc}") from None
        except TimeoutError:
            raise InferenceError("backend_unavailable", f"{url}: timed out") from None
        except (json.JSONDecodeError, UnicodeError) as exc:
            raise InferenceError("backend_error", f"{url}: malformed stream: {exc}") from None
        if stats is not None:
            stats.tokens = stats.tokens or deltas
            stats.timings["total"] = time.monotonic() - start

    async def prefill(self, request: GenerationRequest) -> None:
        """The server does its own prefix caching (vLLM: --enable-prefix-caching)."""

    async def drop(self, session_id: str, turn_id: str) -> None: ...

    async def forget(self, session_id: str) -> None: ...


async def _reason(response: aiohttp.ClientResponse) -> str:
    text = (await response.text())[:500]
    try:
        data = json.loads(text)
        error = data.get("error", data)
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (json.JSONDecodeError, AttributeError):
        return text or response.reason or ""
