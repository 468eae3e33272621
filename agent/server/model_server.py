"""`voice-agent serve-model`: the inference pool as an OpenAI-compatible model server.

The `InferencePool` (workers, continuous batching, KV reuse, speculative prefill, OOM
handling, restarts) behind the chat-completions wire that `agent.inference.openai` speaks
to vLLM: audio as `input_audio` parts (base64 WAV), `stream: true` as SSE. Many processes
(media frontends, livekit-agents jobs) then share one pool, over TCP or a Unix socket.

Endpoints: `POST /v1/chat/completions`, `GET /v1/models` (with vLLM's `max_model_len`),
`DELETE /v1/conversations/{key}` (forget), `DELETE /v1/conversations/{key}/turns/{turn}`
(drop a speculative prefill), `POST …/turns/{turn}/promote`, `/healthz` = `/readyz` (503 while
no worker can answer), `/livez`, `/metrics`.

KV reuse: by an explicit conversation key, the `X-Conversation-Id` header (our client sends
its session id). The key, scoped to the credential that sent it (`<tenant>/k/<key>`, the
tenant a digest of the bearer token), is the pool's session id, so the pool routes a
conversation's turns to the worker holding its history, and the engine reuses the longest
common prefix. One client can therefore neither forget, drop nor promote another's key, nor
learn from `cached_tokens` whether its prompt matches another's conversation; LRU eviction
takes the keys of the client holding the most first.
Keys are bounded (`model_server.max_conversations`, LRU) and expire
(`model_server.conversation_ttl_s` idle); a request without a key is answered and
forgotten at once. Errors are OpenAI-style JSON; `busy` is 429, no worker 503, both with
`Retry-After`. A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import stat
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import numpy as np
from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from agent.config import Settings
from agent.errors import describe_validation_error
from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.model.qwen2_audio import from_openai_messages
from agent.server.middleware import IDENTITY, bearer_auth, json_errors
from agent.server.model_metrics import ModelMetrics
from agent.server.model_wire import (
    CONVERSATION_HEADER,
    FEATURES,
    FEATURES_HEADER,
    KEY_RE,
    TURN_HEADER,
    ChatRequest,
    ConversationKeys,
    decode_audio,
    error_body,
    retry_after_s,
    status_of,
)
from agent.server.secrets import (
    LOCAL_TENANT,
    Credentials,
    SecretError,
    bind_private,
    private_socket,
    read_token_file,
    redact_access_log,
)

log = logging.getLogger(__name__)

SWEEP_S = 5.0  # how often idle conversation keys are looked for
BIG_BODY = 4 * 1024**2  # bytes: a body this large is parsed in a thread (~10 ms of work and more)
TENANT = IDENTITY  # the request's client (`agent.server.secrets.Credentials`), set by `bearer_auth`


class ModelServer:
    """The pool, its conversation keys and metrics; `app()` is the aiohttp application."""

    def __init__(self, pool: Any, settings: Settings, token: str | None = None, tokens: list[str] | None = None) -> None:
        """`token`/`tokens`: the bearer tokens accepted, each a client whose conversation keys
        are its own (none: no authentication, one client)."""
        self.pool = pool
        self.settings = settings
        self.token = token
        self.credentials = Credentials([*([token] if token else []), *(tokens or [])])
        ms = settings.model_server
        self.keys = ConversationKeys(ms.max_conversations, ms.conversation_ttl_s)
        self.metrics = ModelMetrics(self)
        self.max_model_len = max_model_len(getattr(pool, "model_name", settings.model))
        self.created = int(time.time())
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def model_names(self) -> set[str]:
        return {self.pool.model_name, self.settings.model}

    # ---- the application ------------------------------------------------------------------

    def app(self) -> web.Application:
        redact_access_log()  # `-v` logs request lines: never a token in them
        app = web.Application(client_max_size=self.settings.model_server.max_body_bytes,
                              middlewares=[json_errors(_render, too_large=(
                                  "request body too large (model_server.max_body_bytes="
                                  f"{self.settings.model_server.max_body_bytes})"), quiet=(ConnectionResetError,)),
                                  bearer_auth(self.credentials.tenant if self.credentials else None, _render)])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_delete("/v1/conversations/{key}", self.forget)
        app.router.add_delete("/v1/conversations/{key}/turns/{turn}", self.drop)
        app.router.add_post("/v1/conversations/{key}/turns/{turn}/promote", self.promote)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.healthz)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/metrics", self.render_metrics)
        app.on_response_prepare.append(self._features_header)
        app.on_startup.append(self._start_sweeper)
        app.on_cleanup.append(self._stop_sweeper)
        return app

    def runner(self) -> web.AppRunner:
        """The app's runner: a handler is cancelled when its client disconnects, which
        closes the generation (the pool then cancels it in its worker)."""
        return web.AppRunner(self.app(), handle_signals=False, handler_cancellation=True)

    @staticmethod
    async def _features_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[FEATURES_HEADER] = ", ".join(FEATURES)  # how our client tells us from vLLM

    async def _start_sweeper(self, app: web.Application) -> None:
        self._spawn(self._sweep())

    async def _stop_sweeper(self, app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_S, self.keys.ttl_s / 4))
            await self._forget(self.keys.expire(), "idle")

    async def _forget(self, keys: list[str], why: str) -> None:
        for key in keys:
            log.info("conversation %s forgotten (%s)", key, why)
            await self.pool.forget(key)

    # ---- endpoints ------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """Readiness (`/healthz`, `/readyz`): 503 with the reason while no worker can answer."""
        reason = None if getattr(self.pool, "healthy", True) else (
            getattr(self.pool, "health_reason", None) or "no inference worker is running")
        body = {"status": "ok" if reason is None else "unavailable", "model": self.pool.model_name,
                "queue_depth": self.pool.queue_depth, "conversations": len(self.keys)}
        if reason is not None:
            body["reason"] = reason
        return web.json_response(body, status=200 if reason is None else 503)

    async def livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def render_metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.pool.model_name, "object": "model", "created": self.created, "owned_by": "voice-agent",
                "root": self.pool.model_name, "max_model_len": self.max_model_len,
                "voice_agent": {"features": list(FEATURES), "conversation_header": CONVERSATION_HEADER}}
        return web.json_response({"object": "list", "data": [card]})

    @staticmethod
    def scoped(tenant: str, key: str) -> str:
        """The pool's session id of `key` sent by `tenant`: one client's key is never another's."""
        return f"{tenant}/k/{key}"

    def _scoped(self, request: web.Request, key: str) -> str:
        return self.scoped(request.get(TENANT, LOCAL_TENANT), _key(key))

    async def forget(self, request: web.Request) -> web.Response:
        key = self._scoped(request, request.match_info["key"])
        self.keys.remove(key)
        await self.pool.forget(key)
        return web.Response(status=204)

    async def drop(self, request: web.Request) -> web.Response:
        await self.pool.drop(self._scoped(request, request.match_info["key"]), _key(request.match_info["turn"]))
        return web.Response(status=204)

    async def promote(self, request: web.Request) -> web.Response:
        await self.pool.promote(self._scoped(request, request.match_info["key"]), _key(request.match_info["turn"]))
        return web.Response(status=204)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        key = request.headers.get(CONVERSATION_HEADER)
        if key is not None:
            key = self._scoped(request, key)
        turn = _key(request.headers.get(TURN_HEADER) or uuid.uuid4().hex)
        raw = await request.read()
        known = self.keys.clips(key) if key is not None else {}
        # A whole conversation's audio is megabytes of JSON: parsed off the event loop, so
        # other streams keep flowing meanwhile.
        parsed = await asyncio.to_thread(self._parse, raw, known) if len(raw) > BIG_BODY else self._parse(raw, known)
        if isinstance(parsed, web.Response):
            return parsed
        body, messages, audios, used = parsed
        max_new = body.max_new_tokens(self.settings.max_new_tokens)
        min_tokens = (body.model_extra or {}).get("min_tokens")  # vLLM's extension: EOS suppressed until then
        extra = {"min_new_tokens": min_tokens} if type(min_tokens) is int and min_tokens > 0 else {}
        if body.prefill_only or max_new == 0:
            if key is None:
                return fail(400, f"a prefill-only request needs the {CONVERSATION_HEADER} header",
                            "invalid_request_error", "invalid_request")
            await self._forget(self.keys.touch(key), "lru")
            self.keys.keep_clips(key, used)
            await self.pool.prefill(GenerationRequest(key, turn, messages, audios, max(1, max_new or 1),
                                                      speculative=True, extra=extra))
            self.metrics.requests.labels("prefill").inc()
            return web.Response(status=204)
        session = key if key is not None else f"{request.get(TENANT, LOCAL_TENANT)}/a/{uuid.uuid4().hex}"
        if key is not None:
            await self._forget(self.keys.begin(key), "lru")
            self.keys.keep_clips(key, used)
        generation = GenerationRequest(session, turn, messages, audios, max_new, preemptive=body.preemptive,
                                       extra=extra)
        try:
            return await self._answer(request, body, generation, started)
        finally:
            if key is not None:
                self.keys.end(key)
            else:
                self._spawn(self.pool.forget(session))  # no key: nothing of it is kept

    def _parse(self, raw: bytes, known: dict[str, np.ndarray]) -> web.Response | tuple[
            ChatRequest, list[dict[str, Any]], list[np.ndarray], dict[str, np.ndarray]]:
        """The body, validated, and its messages in our format; or the 4xx answer."""
        try:
            body = ChatRequest.model_validate(json.loads(raw))
        except (ValueError, RecursionError, ValidationError) as exc:
            reason = describe_validation_error(exc, "body") if isinstance(exc, ValidationError) else \
                f"the body is not JSON: {str(exc)[:200]}"
            return fail(400, reason, "invalid_request_error", "invalid_request")
        if body.model not in self.model_names:
            return fail(404, f"the model {body.model!r} does not exist here; this server serves "
                        f"{self.pool.model_name!r}", "invalid_request_error", "model_not_found")
        if (problem := body.unsupported()) is not None:
            return fail(400, problem, "invalid_request_error", "unsupported")
        max_new = body.max_new_tokens(self.settings.max_new_tokens)
        if max_new > self.max_model_len:
            return fail(400, f"max_tokens {max_new} exceeds the model's context ({self.max_model_len})",
                        "invalid_request_error", "invalid_request")
        used: dict[str, np.ndarray] = {}

        def decode(data: str, fmt: str) -> np.ndarray:
            clip = known.get(data)
            if clip is None:
                clip = decode_audio(data, fmt)
            used[data] = clip
            return clip

        try:
            messages, audios = from_openai_messages([m.model_dump() for m in body.messages], decode)
        except ValueError as exc:
            return fail(400, str(exc), "invalid_request_error", "invalid_audio")
        return body, messages, audios, used

    async def _answer(self, request: web.Request, body: ChatRequest, generation: GenerationRequest,
                      started: float) -> web.StreamResponse:
        stats = GenerationStats()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": self.pool.model_name}
        outcome = "cancelled"
        first: float | None = None
        try:
            async with aclosing(self.pool.generate(generation, stats)) as deltas:
                try:
                    text = await anext(deltas, None)
                except InferenceError as exc:
                    outcome = "error"
                    self.metrics.errors.labels(exc.code).inc()
                    return inference_failure(exc)
                first = time.perf_counter()
                if not body.stream:
                    parts = [text or ""]
                    try:
                        async for delta in deltas:
                            parts.append(delta)
                    except InferenceError as exc:
                        outcome = "error"
                        self.metrics.errors.labels(exc.code).inc()
                        return inference_failure(exc)
                    outcome = "done"
                    return web.json_response({**head, "object": "chat.completion", "choices": [{
                        "index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                        "finish_reason": _finish(stats, generation)}], "usage": _usage(stats)})
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
                chunk = {**head, "object": "chat.completion.chunk"}

                async def send(payload: dict[str, Any] | str) -> None:
                    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
                    await response.write(f"data: {data}\n\n".encode())

                await send({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text or ""},
                                                  "finish_reason": None}]})
                # Per token only the delta is serialized: the rest of the chunk is the same each time.
                head_json = json.dumps(chunk, ensure_ascii=False)[:-1]
                try:
                    async for delta in deltas:
                        await send(f'{head_json}, "choices": [{{"index": 0, "delta": {{"content": '
                                   f'{json.dumps(delta, ensure_ascii=False)}}}, "finish_reason": null}}]}}')
                except InferenceError as exc:  # after the 200: an error chunk, as vLLM sends
                    outcome = "error"
                    self.metrics.errors.labels(exc.code).inc()
                    await send(error_body(exc.message, status_of(exc.code)[1], exc.code))
                    await response.write_eof()
                    return response
                await send({**chunk, "choices": [{"index": 0, "delta": {},
                                                  "finish_reason": _finish(stats, generation)}]})
                if body.include_usage:
                    await send({**chunk, "choices": [], "usage": _usage(stats)})
                await send("[DONE]")
                outcome = "done"
                await response.write_eof()
                return response
        except ConnectionResetError:  # the client left while we wrote: the generation is closed
            outcome = "cancelled"
            raise
        finally:
            self.metrics.observe(outcome, stats, started, first)


def fail(status: int, message: str, kind: str, code: str, **headers: str) -> web.Response:
    return web.json_response(error_body(message, kind, code), status=status, headers=headers)


def _render(status: int, reason: str, code: str, headers: dict[str, str]) -> web.Response:
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return fail(status, reason, kind, code, **headers)


def inference_failure(exc: InferenceError) -> web.Response:
    status, kind = status_of(exc.code)
    headers = {"Retry-After": str(retry_after_s(exc.message))} if status in (429, 503) else {}
    return fail(status, exc.message, kind, exc.code, **headers)


def _key(value: str) -> str:
    if not KEY_RE.match(value):
        raise web.HTTPBadRequest(text=f"bad conversation key or turn id {value[:40]!r}: "
                                 "1-128 characters of A-Z a-z 0-9 . _ : / @ -")
    return value


def _finish(stats: GenerationStats, request: GenerationRequest) -> str:
    return "length" if stats.tokens >= request.max_new_tokens else "stop"


def _usage(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.tokens,
            "total_tokens": stats.prompt_tokens + stats.tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def max_model_len(model: str) -> int:
    """The model's context window (vLLM's `max_model_len`): its text config's positions."""
    from agent.inference import models

    if model == models.RANDOM_7B:
        return 8192  # models._config's
    try:
        from transformers import AutoConfig

        source = str(models.tiny_random_dir()) if model == models.TINY_RANDOM else model
        config = AutoConfig.from_pretrained(source)
        return int(config.text_config.max_position_embeddings)
    except Exception as exc:  # the workers loaded it; this is only a report
        log.warning("cannot read %s's context length (%s): reporting 8192", model, exc)
        return 8192


# ---- listening ----------------------------------------------------------------------------

def parse_listen(uri: str) -> tuple[str, str, int]:
    """`tcp://HOST:PORT` → ("tcp", host, port); `unix:///path` → ("unix", path, 0)."""
    if uri.startswith("unix://"):
        path = uri[len("unix://"):]
        if not path:
            raise ValueError(f"{uri!r}: no socket path (unix:///path/to/model.sock)")
        return "unix", path, 0
    url = URL(uri)
    if url.scheme != "tcp" or not url.host or url.explicit_port is None:
        raise ValueError(f"{uri!r}: listen on tcp://HOST:PORT or unix:///PATH")
    return "tcp", url.host, url.explicit_port


def is_local(kind: str, host: str) -> bool:
    """A Unix socket (file permissions guard it) or a loopback address."""
    if kind == "unix" or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_model_server(settings: Settings, listen: str | None = None, token: str | None = None, *,
                           ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None,
                           token_file: str | None = None) -> int:
    """Start the pool, serve until `stop` (or SIGINT/SIGTERM when none is given). 0 on a clean
    stop, 2 when it cannot start. `ready(url)` is called once it accepts connections (then
    `/healthz` answers 200); `url` is what `--openai-url` takes. Tokens: `token`, the lines of
    `token_file` (else `model_server.token_file`), `model_server.token` and `.tokens`."""
    listen = listen or settings.model_server.listen
    ms = settings.model_server
    try:
        tokens = [*([token] if token else []), *([ms.token] if ms.token else []), *ms.tokens]
        if token_file or ms.token_file:
            tokens += read_token_file(token_file or ms.token_file or "")
        kind, host, port = parse_listen(listen)
        if kind == "unix":
            private_socket(host)  # before the model loads: refused now, not minutes later
    except (ValueError, SecretError) as exc:
        print(f"voice-agent: {exc}", file=sys.stderr)
        return 2
    if not tokens and not is_local(kind, host):
        print(f"voice-agent: serve-model on {listen} is reachable from other hosts: set a token "
              "(--token-file, VOICE_AGENT_MODEL_SERVER__TOKEN or model_server.token_file)", file=sys.stderr)
        return 2
    from agent.runtime import create_backend

    pool = create_backend(settings.model_copy(update={"backend": "transformers"}))
    try:
        await pool.start()
    except Exception as exc:
        print(f"voice-agent: cannot start the inference pool: {exc}", file=sys.stderr)
        await _quietly(pool.close())
        return 2
    server = ModelServer(pool, settings, tokens=tokens)
    runner = server.runner()
    await runner.setup()
    try:
        if kind == "unix":
            private_socket(host)  # again: the model took a while to load
            await _remove_stale_socket(host)
            site: web.BaseSite = web.UnixSite(runner, host)
            await bind_private(host, site.start)  # 0600: the socket needs no token, so no one else may connect
            url = f"unix://{host}"
        else:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else port
            url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/v1"
    except (OSError, SecretError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"voice-agent: cannot listen on {listen}: {reason}", file=sys.stderr)
        await runner.cleanup()
        await _quietly(pool.close())
        return 2
    own_signals = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    print(f"voice-agent: model server on {url} (model {pool.model_name})", file=sys.stderr, flush=True)
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        if own_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
        await _quietly(pool.close())
        if kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(host)
    return 0


async def _remove_stale_socket(path: str) -> None:
    """A socket file nobody answers on is an earlier run's: remove it. One in use stays
    (binding then fails: address in use)."""
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        return
    except OSError:
        return
    writer.close()


async def _quietly(coro: Awaitable[Any]) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("shutdown step failed: %s", exc)
