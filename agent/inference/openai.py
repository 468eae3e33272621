"""Backend for any OpenAI-compatible chat-completions server that serves Qwen2-Audio.

This is how users scale past one machine: vLLM replicas (or tensor parallel) behind it,
the agent processes stateless per session. Serve the model, then point the agent at it:

    vllm serve Qwen/Qwen2-Audio-7B-Instruct --limit-mm-per-prompt '{"audio": 5}'
    voice-agent serve --backend openai --openai-url http://host:8000/v1
    voice-agent run talk.wav --backend openai --openai-url http://host:8000/v1

`--limit-mm-per-prompt` caps the audio parts of one prompt (a turn over 30 s is several):
`openai_max_audios` (default 5) must match it; older turns then go without their audio.

Wire format: audio goes as `{"type": "input_audio", "input_audio": {"data": <base64 16 kHz
mono WAV>, "format": "wav"}}` parts, text as `{"type": "text"}` parts; `"stream": true`
answers with SSE lines `data: {json}` carrying `choices[0].delta.content`, ending
`data: [DONE]`. Errors become `InferenceError`: unreachable / timed out →
`backend_unavailable`, HTTP 429 → `busy`, 503 → `backend_unavailable` (both with the
server's Retry-After), any other HTTP error or a broken stream → `backend_error`, each
message naming the URL. A stream cut mid-answer says after how many
tokens; the session ends that turn with `response.cancelled` (reason `backend_error`).

Our own pool server (`voice-agent serve-model`, also at `unix:///path/to/socket`) says so
in an `X-Voice-Agent-Features` header and in `/v1/models`; against it, this client also
sends the session id as `X-Conversation-Id` (its KV stays on the worker between turns),
and `prefill`, `drop`, `promote` and `forget` go over the wire. Against vLLM they do nothing.

At start the backend reads `{base_url}/models` (`agent.inference.served`): the model's name
when the server serves exactly one and none is configured, and vLLM's `max_model_len`, which
caps the conversation's context budget. It asks again every `health_interval_s`: `healthy`
(hence `/healthz`) is False while the server does not answer. `max_audios` is the server's
`--limit-mm-per-prompt` audio count: conversations keep at most that many clips per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
from yarl import URL

from agent.inference.base import POOL_CODES, GenerationRequest, GenerationStats, InferenceError
from agent.inference.served import HealthProbe, ServedModel, pick
from agent.model.family import Family
from agent.model.qwen2_audio import audio_base64, to_openai_messages

CLIP_CACHE_BYTES = 128 * 1024 * 1024
# `serve-model`'s extensions (agent.server.model_wire has the same names; kept apart so the
# client does not import the server)
FEATURES_HEADER = "X-Voice-Agent-Features"
CONVERSATION_HEADER = "X-Conversation-Id"
TURN_HEADER = "X-Turn-Id"

log = logging.getLogger(__name__)
KEEPALIVE_S = 4.0  # seconds an idle connection is kept: under uvicorn's 5 s


class ClipCache:
    """Base64 WAV of the clips already sent. Every request carries the whole conversation,
    so without it each earlier turn's audio is encoded again on every request, on the event
    loop. Keyed by the clip's identity (a conversation keeps its clips as the same arrays);
    an entry goes when its clip is freed, or the least recently used when over `max_bytes`."""

    def __init__(self, max_bytes: int = CLIP_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.encoded = 0  # clips encoded (misses), for tests and metrics
        self.reused = 0
        self._entries: OrderedDict[int, tuple[weakref.ref[np.ndarray], str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, clip: np.ndarray) -> str:
        key = id(clip)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is clip:
            self._entries.move_to_end(key)
            self.reused += 1
            return entry[1]
        data = audio_base64(clip)
        self.encoded += 1
        self._remove(key)
        if len(data) <= self.max_bytes:
            self._entries[key] = (weakref.ref(clip, lambda ref, key=key: self._freed(key, ref)), data)  # type: ignore[misc]
            self.size += len(data)
            while self.size > self.max_bytes:
                self._remove(next(iter(self._entries)))
        return data

    def _freed(self, key: int, ref: weakref.ref[np.ndarray]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:  # not a newer clip that got the same id
            self._remove(key)

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(entry[1])


class OpenAIBackend:
    """Streams answers from `{base_url}/chat/completions`; holds no per-session state.

    `timeout` is the longest wait for the next bytes of an answer (not a cap on its whole
    length, which a long answer may exceed); `connect_timeout` bounds reaching the server.
    """

    name = "openai"
    warning: str | None = None

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 5.0, health_interval_s: float = 5.0, max_audios: int | None = 5) -> None:
        self._socket = base_url[len("unix://"):] if base_url.startswith("unix://") else None
        if self._socket is not None:  # `voice-agent serve-model --listen unix:///path`
            if not self._socket:
                raise ValueError(f"OpenAI backend URL unix:// needs a socket path, got {base_url!r}")
            base_url = "http://localhost/v1"
        url = URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"OpenAI backend URL must be http(s)://host[:port]/v1 or unix:///path, got {base_url!r}")
        self.base_url = str(url)
        self.features: set[str] = set()  # what a `serve-model` server offers beyond the OpenAI API
        self._requested = model  # None: the one model the server serves
        self.model_name = model or ""
        self.tokenizer: Any = None
        self.family: Family | None = None  # the served model's format (prompt budgets), once known
        self.max_audios = max_audios
        self.max_model_len: int | None = None  # the server's, once known
        self._probe = HealthProbe(lambda: self._http, self.base_url, health_interval_s, connect_timeout,
                                  self._learn, self._readiness)
        self._api_key = api_key
        # `connect` covers DNS and the TCP/TLS handshake; no `total`: answers stream for long.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=timeout)
        self._http: aiohttp.ClientSession | None = None
        self._in_flight = 0
        self._tokenizer_source: str | None = None
        self.clips = ClipCache()

    @property
    def queue_depth(self) -> int:
        """Requests this process has in flight (the server keeps its own queue)."""
        return self._in_flight

    @property
    def healthy(self) -> bool:
        """The server answered the latest probe (or request)."""
        return self._probe.up

    @property
    def health_reason(self) -> str | None:
        return None if self._probe.up else self._probe.reason or f"the OpenAI server {self.base_url} does not answer"

    def _readiness(self) -> str | None:
        """Our serve-model's readiness URL (its model list answers while no worker is up)."""
        return str(URL(self.base_url).with_path("/readyz")) if self.features else None

    async def start(self) -> None:
        """Raises InferenceError when the server is up but does not serve the model asked for;
        a server not up yet is only logged (it may still be loading), and probed until it is."""
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            # No client-side connection cap: the server queues, a cap would only hide waiting
            # (and count against `connect_timeout`). Idle connections are dropped before vLLM's
            # server (uvicorn, 5 s) closes them: a request sent on a connection the server is
            # closing fails with "Server disconnected" (seen when `bench inference --compare-vllm`
            # left vLLM idle while serve-model ran).
            connector = (aiohttp.UnixConnector(self._socket, limit=0, keepalive_timeout=KEEPALIVE_S)
                         if self._socket is not None else aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S))
            self._http = aiohttp.ClientSession(headers=headers, timeout=self._timeout, connector=connector)
            await self._discover()
            if self.features:  # our serve-model: its one model, as `_discover` chose
                self._requested = self.model_name or self._requested
        try:
            pick(self._requested, await self._probe.check(), self.base_url)
        except InferenceError as exc:
            if exc.code != "backend_unavailable":
                await self.close()
                raise
            log.warning("%s; /healthz says unavailable until it answers", exc.message)
        self._probe.start()
        await self._load_tokenizer()

    async def _load_tokenizer(self) -> None:
        """From the local HF cache or the checkpoint's directory, if there (exact budgets)."""
        if self.tokenizer is None and self.model_name:
            from agent.inference.models import known_family, load_tokenizer

            source = self._tokenizer_source or self.model_name
            self.tokenizer = await asyncio.to_thread(load_tokenizer, source)
            self.family = await asyncio.to_thread(known_family, source)

    def _learn(self, served: list[ServedModel]) -> None:
        """What the server serves (each probe): the model's name and context length."""
        try:
            model = pick(self._requested, served, self.base_url)
        except InferenceError as exc:
            log.warning("%s", exc.message)
            return
        self.model_name = model.id
        self._tokenizer_source = model.root
        self.max_model_len = model.max_model_len

    async def close(self) -> None:
        await self._probe.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _discover(self) -> None:
        """Is it our pool server? Best effort: a server not up yet is found out later, from
        the features header of its answers. Our server names its model: a client left at
        the default model name takes it (and its tokenizer)."""
        assert self._http is not None
        try:
            async with self._http.get(f"{self.base_url}/models") as response:
                data = await response.json() if response.status == 200 else {}
                self._note_features(response)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        cards = [c for c in (data.get("data") or []) if isinstance(c, dict)] if isinstance(data, dict) else []
        served = [c.get("id") for c in cards if isinstance(c.get("voice_agent"), dict)]
        if self.features and len(served) == 1 and isinstance(served[0], str) and self.model_name not in served:
            log.info("%s serves %s: using it instead of %s", self.base_url, served[0], self.model_name)
            self.model_name = served[0]

    def _note_features(self, response: aiohttp.ClientResponse) -> None:
        header = response.headers.get(FEATURES_HEADER)
        if header is not None:
            self.features = {f.strip() for f in header.split(",") if f.strip()}

    async def _call(self, method: str, path: str) -> None:
        """A conversation call to our server (forget, drop, promote): failures only logged —
        the server forgets idle conversations on its own."""
        if self._http is None:
            return
        try:
            async with self._http.request(method, f"{self.base_url}/conversations/{path}") as response:
                if response.status >= 400:
                    log.warning("%s %s: HTTP %d: %s", method, path, response.status, await _reason(response))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s %s failed: %s", method, path, exc)

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncGenerator[str, None]:
        """Stream the answer's text deltas. Closing the iterator closes the HTTP stream,
        which is how vLLM learns to stop generating."""
        if self._http is None:
            raise InferenceError("backend_unavailable", f"OpenAI backend for {self.base_url} is not started")
        url = f"{self.base_url}/chat/completions"
        if not self.model_name:  # the server was down at start: learn its model now
            pick(self._requested, await self._probe.check(), self.base_url)
            await self._load_tokenizer()
        # Greedy, like the local engine, so both backends answer alike.
        messages = to_openai_messages(request.messages, request.audios, self.clips.encode)
        body = {"model": self.model_name, "messages": messages, "stream": True,
                "max_tokens": request.max_new_tokens, "temperature": 0.0,
                "stream_options": {"include_usage": True}}
        if request.extra.get("min_new_tokens"):  # vLLM's name too
            body["min_tokens"] = int(request.extra["min_new_tokens"])
        if request.preemptive and "conversation" in self.features:
            body["preemptive"] = True
        # The conversation key our server routes by (to the worker holding its KV).
        headers = {CONVERSATION_HEADER: request.session_id, TURN_HEADER: request.turn_id}
        start = time.monotonic()
        deltas = 0
        self._in_flight += 1
        try:
            async with self._http.post(url, json=body, headers=headers) as response:
                done = False
                try:
                    self._note_features(response)
                    if response.status == 404:
                        raise await self._not_found(url, response)
                    await _check_status(url, response, ours=bool(self.features))
                    async with aclosing(_sse_deltas(url, response, ours=bool(self.features))) as events:
                        async for text, usage in events:
                            if usage:
                                if stats is not None:
                                    stats.tokens = int(usage.get("completion_tokens") or 0)
                                    stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                                    details = usage.get("prompt_tokens_details") or {}
                                    stats.reused_tokens = int(details.get("cached_tokens") or 0)
                                continue
                            if deltas == 0 and stats is not None:
                                stats.timings["ttft"] = time.monotonic() - start
                            deltas += 1
                            yield text
                    done = True
                    self._probe.mark(True)  # an answer: up now, not at the next probe
                    self._probe.reason = None
                finally:
                    if not done:
                        # Early exit (aclose, cancel, error): drop the connection rather than
                        # return it to the pool, so the server sees the client leave and stops.
                        response.close()
        except TimeoutError:
            raise InferenceError("backend_unavailable", f"{url}: no answer within the timeout") from None
        except (aiohttp.ClientError, _StreamEnded) as exc:
            if isinstance(exc, aiohttp.ClientConnectionError):
                self._probe.mark(False)
            if deltas:  # the answer began: say how far it got, not aiohttp's words for the cut
                raise InferenceError("backend_error", f"{url}: the server closed the stream after "
                                     f"{deltas} token{'s' if deltas != 1 else ''}") from None
            if isinstance(exc, aiohttp.ClientConnectionError):
                raise InferenceError("backend_unavailable", f"cannot reach {url}: {exc}") from None
            raise InferenceError("backend_error", f"{url}: the server closed the stream before the answer "
                                 "began") from None
        finally:
            self._in_flight -= 1
        if stats is not None:
            stats.tokens = stats.tokens or deltas
            stats.timings["total"] = time.monotonic() - start

    async def _not_found(self, url: str, response: aiohttp.ClientResponse) -> InferenceError:
        """A 404: usually a model name the server does not serve; say which it does."""
        reason = await _reason(response)
        try:
            pick(self.model_name, await self._probe.check(), self.base_url)
        except InferenceError as exc:
            return InferenceError("backend_error", exc.message)
        return InferenceError("backend_error", f"{url}: HTTP 404: {reason}")

    async def prefill(self, request: GenerationRequest) -> None:
        """Our server: a prefill-only request (answered 204, fire and forget). vLLM: nothing —
        it does its own prefix caching (--enable-prefix-caching), and a speculative request
        would cost a full answer."""
        if "prefill" not in self.features or self._http is None:
            return
        messages = to_openai_messages(request.messages, request.audios, self.clips.encode)
        body = {"model": self.model_name, "messages": messages, "max_tokens": request.max_new_tokens,
                "prefill_only": True}
        headers = {CONVERSATION_HEADER: request.session_id, TURN_HEADER: request.turn_id}
        try:
            async with self._http.post(f"{self.base_url}/chat/completions", json=body, headers=headers) as response:
                if response.status >= 400:
                    log.debug("prefill of %s refused: HTTP %d", request.session_id, response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("prefill of %s failed: %s", request.session_id, exc)

    async def drop(self, session_id: str, turn_id: str) -> None:
        """Our server: discard the turn's speculative prefill. vLLM: none to drop."""
        if "drop" in self.features:
            await self._call("DELETE", f"{quote(session_id, safe='')}/turns/{quote(turn_id, safe='')}")

    async def promote(self, session_id: str, turn_id: str) -> None:
        """Our server: the preemptive answer now runs as committed work. vLLM: nothing to raise."""
        if "promote" in self.features:
            await self._call("POST", f"{quote(session_id, safe='')}/turns/{quote(turn_id, safe='')}/promote")

    async def forget(self, session_id: str) -> None:
        """Our server: free the conversation's KV now. vLLM: no per-session state."""
        if "forget" in self.features:
            await self._call("DELETE", quote(session_id, safe=""))


class _StreamEnded(Exception):
    """The server ended the stream before its finish_reason (or [DONE])."""


async def _check_status(url: str, response: aiohttp.ClientResponse, ours: bool = False) -> None:
    """`ours`: our serve-model, whose `error.code` is the pool's own (`POOL_CODES`): kept."""
    if response.status < 400:
        return
    code = {429: "busy", 503: "backend_unavailable"}.get(response.status, "backend_error")
    retry = response.headers.get("Retry-After")
    after = f" (retry after {retry} s)" if retry else ""
    reason, given = await _error(response)
    raise InferenceError(_code(given, ours) or code, f"{url}: HTTP {response.status}: {reason}{after}")


def _code(given: Any, ours: bool) -> str | None:
    return given if ours and given in POOL_CODES else None


async def _sse_deltas(url: str, response: aiohttp.ClientResponse,
                      ours: bool = False) -> AsyncGenerator[tuple[str, dict[str, Any]]]:
    """(text, {}) per content delta and ("", usage) for a usage chunk, until [DONE]."""
    finished = False
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, `: keep-alive` comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):  # bad syntax, a 5000-digit number, deep nesting
            raise InferenceError("backend_error", f"{url}: malformed stream line {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise InferenceError("backend_error", f"{url}: malformed stream line {data[:200]!r}")
        if chunk.get("error"):  # vLLM reports failures after the 200 as an error chunk
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            given = error.get("code") if isinstance(error, dict) else None
            raise InferenceError(_code(given, ours) or "backend_error", f"{url}: {message}")
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text, {}
            finished = finished or bool(choice.get("finish_reason"))
        if chunk.get("usage"):
            yield "", chunk["usage"]
    if not finished:
        raise _StreamEnded


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The server's own error message (OpenAI/vLLM: {"error": {"message": …}})."""
    return (await _error(response))[0]


async def _error(response: aiohttp.ClientResponse) -> tuple[str, Any]:
    """(message, `error.code` or None) of an error answer."""
    text = (await response.text(errors="replace"))[:500]
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text.strip() or response.reason or "", None
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error), error.get("code")
    return str(error), None
