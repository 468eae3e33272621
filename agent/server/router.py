"""One frontend of `serve --processes N`: sticky routing by session id, and the whole server's view.

Why: N frontend processes accept on one TCP socket (the supervisor's, inherited: the kernel hands
each new connection to one of them), but a session lives in the one process that holds its RTCPeerConnection.
Its events WebSocket, WHIP DELETE and every later request may land on any frontend, so:

- Session ids carry the index of their frontend: `f<index>-<12 hex>` (`FrontendInfo.holder`).
- Each frontend also listens on a private Unix socket, `<run_dir>/frontend-<index>.sock`.
- A request whose path names a session held elsewhere (`/v1/sessions/{id}/…`, `/whip/{id}`) is
  proxied there over that socket — plain HTTP answered as is, WebSockets pumped both ways. A
  request that another frontend forwarded carries `X-Voice-Agent-Frontend` and is always
  answered locally (no loops).
- WebRTC media (UDP) needs nothing: the answer's ICE candidates are the holding process's own
  ports, so the peer's packets go straight there.
- `max_sessions` is the whole server's: each frontend admits its share (split evenly, the
  first ones take the remainder) and an offer that finds its frontend full is offered to the
  others in turn, so every share is used before anyone answers 503.
- `/healthz` (= `/readyz`) and `/metrics` asked from outside gather every frontend's (over the sockets):
  counters, gauges and histograms are summed; per-process gauges (VAD batch size) and each
  frontend's sessions get a `frontend` label.
- A frontend that dies takes its sessions with it. A WebSocket proxied through a surviving
  frontend then gets a `session.ended` with reason `frontend_lost`; the restarted frontend
  publishes the same for each session its predecessor held (read from
  `<run_dir>/frontend-<index>.sessions`), so MQTT and webhooks hear of them too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from agent import events as ev
from agent.server.routes import error

log = logging.getLogger(__name__)

FRONTEND_ENV = "VOICE_AGENT_FRONTEND"  # set by the supervisor: a FrontendInfo as JSON
FORWARDED = "X-Voice-Agent-Frontend"  # a request another frontend forwarded: answer it here
SESSION_PATH = re.compile(r"^/(?:v1/sessions|whip)/([^/]+)")
SESSION_ID = re.compile(r"^f(\d+)-")
OFFER_PATHS = ("/v1/sessions", "/whip")
HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "content-length",
               "proxy-connection", "te", "trailer", "sec-websocket-key", "sec-websocket-version",
               "sec-websocket-extensions", "sec-websocket-accept", "content-encoding"}
LOST_SEQ = 2**31 - 1  # a lost session's last seq is unknown: this one is after any it had
PER_PROCESS = {"voice_agent_vad_batch_size"}  # means, not totals: labelled, not summed
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class FrontendInfo:
    index: int
    count: int
    run_dir: str
    max_sessions: int  # the whole server's
    port: int  # the shared TCP port
    openai_url: str | None = None  # the supervisor's model server, when it started one
    listen_fd: int | None = None  # the supervisor's listening socket, inherited (None: bind the port)

    @classmethod
    def from_env(cls) -> FrontendInfo | None:
        raw = os.environ.get(FRONTEND_ENV)
        return None if not raw else cls(**json.loads(raw))

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def socket(self, index: int) -> str:
        return os.path.join(self.run_dir, f"frontend-{index}.sock")

    @property
    def share(self) -> int:
        """This frontend's part of max_sessions (at least 1)."""
        base, extra = divmod(self.max_sessions, self.count)
        return max(1, base + (1 if self.index < extra else 0))

    def new_session_id(self) -> str:
        import uuid

        return f"f{self.index}-{uuid.uuid4().hex[:12]}"

    def holder(self, session_id: str | None) -> int:
        """The frontend that holds `session_id`; agent-wide (None) and foreign ids belong to 0."""
        m = SESSION_ID.match(session_id or "")
        index = int(m.group(1)) if m else 0
        return index if index < self.count else 0

    def owns(self, session_id: str | None) -> bool:
        return self.holder(session_id) == self.index


class Router:
    """The routing middleware, the aggregated endpoints and the lost-session notices of one frontend."""

    def __init__(self, info: FrontendInfo) -> None:
        self.info = info
        self._clients: dict[str, aiohttp.ClientSession] = {}  # by Unix socket
        self._sessions: set[str] = set()
        self._sessions_file = Path(info.run_dir) / f"frontend-{info.index}.sessions"

    # ---- wiring -------------------------------------------------------------------
    def attach_runtime(self, runtime: Any) -> None:
        runtime.new_session_id = self.info.new_session_id
        runtime.owns = self.info.owns
        runtime.frontend = self.info.index
        runtime.bus.add_listener(self._track)

    def attach_app(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.on_cleanup.append(self._close)

    def site(self, runner: web.AppRunner) -> web.UnixSite:
        return web.UnixSite(runner, self.info.socket(self.info.index))

    def announce_lost(self, runtime: Any) -> None:
        """`session.ended` (frontend_lost) for every session a dead predecessor held."""
        try:
            lost = json.loads(self._sessions_file.read_text())
        except (OSError, ValueError):
            return
        for session_id in lost:
            runtime.bus.publish(ev.SessionEnded(session_id=session_id, reason="frontend_lost", seq=LOST_SEQ))
        self._write_sessions()
        if lost:
            log.warning("frontend %d: %d sessions of the previous process were lost", self.info.index, len(lost))

    def _track(self, event: ev.Event) -> None:
        if isinstance(event, ev.SessionStarted):
            self._sessions.add(event.session_id)
        elif isinstance(event, ev.SessionEnded) and event.session_id in self._sessions:
            self._sessions.discard(event.session_id)
        else:
            return
        self._write_sessions()

    def _write_sessions(self) -> None:
        tmp = self._sessions_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(self._sessions)))
        tmp.replace(self._sessions_file)

    def client(self, index: int | str) -> aiohttp.ClientSession:
        """A client for frontend `index`'s socket, or for the socket at a path."""
        path = self.info.socket(index) if isinstance(index, int) else index
        if path not in self._clients:
            self._clients[path] = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                                        timeout=aiohttp.ClientTimeout(total=None, connect=5))
        return self._clients[path]

    @property
    def model_socket(self) -> str | None:
        url = self.info.openai_url or ""
        return url[len("unix://"):] if url.startswith("unix://") else None

    async def _close(self, app: web.Application) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    # ---- the middleware -----------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get(FORWARDED) is not None:
            return await handler(request)
        if request.path in ("/healthz", "/readyz") and request.method == "GET":
            return await self.healthz()
        if request.path == "/metrics" and request.method == "GET":
            return await self.metrics(request)
        m = SESSION_PATH.match(request.path)
        if m is not None and (holder := self.info.holder(m.group(1))) != self.info.index:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self.proxy_websocket(request, holder, m.group(1))
            return await self.proxy(request, holder)
        response = await handler(request)
        if response.status == 503 and request.method == "POST" and request.path in OFFER_PATHS:
            return await self._spill(request, response)
        return response

    def _headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers[FORWARDED] = str(self.info.index)
        return headers

    async def proxy(self, request: web.Request, index: int) -> web.StreamResponse:
        try:
            async with self.client(index).request(request.method, f"http://frontend{request.rel_url}",
                                                  headers=self._headers(request), data=await request.read(),
                                                  allow_redirects=False) as r:
                body = await r.read()
                headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(status=r.status, body=body, headers=headers)
        except (aiohttp.ClientConnectionError, FileNotFoundError):
            return error(404, f"no such session: frontend {index} is not running (its sessions ended)")

    async def _spill(self, request: web.Request, full: web.StreamResponse) -> web.StreamResponse:
        """This frontend's share is taken: offer the session to the others in turn."""
        for step in range(1, self.info.count):
            index = (self.info.index + step) % self.info.count
            response = await self.proxy(request, index)
            if response.status not in (404, 503):
                return response
        return error(503, f"server is at its limit of {self.info.max_sessions} sessions", **{"Retry-After": "5"})

    async def proxy_websocket(self, request: web.Request, index: int, session_id: str) -> web.StreamResponse:
        url = f"http://frontend{request.rel_url}"
        try:
            upstream = await self.client(index).ws_connect(url, headers=self._headers(request), heartbeat=30.0)
        except aiohttp.WSServerHandshakeError as exc:
            return error(exc.status, "no such session" if exc.status == 404 else exc.message)
        except (aiohttp.ClientConnectionError, FileNotFoundError):
            return error(404, f"no such session: frontend {index} is not running (its sessions ended)")
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        last_seq, ended = 0, False

        async def down() -> None:
            nonlocal last_seq, ended
            async for msg in upstream:
                if msg.type == WSMsgType.TEXT:
                    try:
                        event = json.loads(msg.data)
                        last_seq = max(last_seq, int(event.get("seq", 0)))
                        ended = ended or event.get("type") == "session.ended"
                    except (ValueError, AttributeError, TypeError):
                        pass
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            if not ended and not ws.closed:  # the holder died: say so, as the session would have
                lost = ev.SessionEnded(session_id=session_id, reason="frontend_lost", seq=last_seq + 1)
                await ws.send_str(lost.model_dump_json())

        async def up() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await upstream.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)

        tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
            await ws.close()
        return ws

    # ---- the whole server's view --------------------------------------------------
    async def _gather(self, path: str, headers: dict[str, str] | None = None) -> list[tuple[int | str, Any]]:
        """(index, (status, body) or None when down) for every frontend, this one included, and
        ("model", …) for the supervisor's model server when there is one."""
        async def one(index: int | str) -> tuple[int | str, Any]:
            try:
                async with self.client(index).get(f"http://frontend{path}", headers={
                        **(headers or {}), FORWARDED: str(self.info.index)},
                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                    return index, (r.status, await r.read())
            except (aiohttp.ClientError, OSError, TimeoutError):
                return index, None

        model = [self.model_socket] if self.model_socket is not None else []
        return list(await asyncio.gather(*(one(i) for i in [*range(self.info.count), *model])))

    async def healthz(self) -> web.Response:
        """The whole server's readiness, by the rule of one process: 503 with the reason whenever
        no answer can be produced (the model server down or loading, no frontend up), 200
        "degraded" while some frontends are down but others answer."""
        frontends: list[dict[str, Any]] = []
        sessions, body0, model_server, model_reason = 0, dict[str, Any](), None, None
        for index, got in await self._gather("/healthz"):
            if isinstance(index, str):  # the model server
                answer = _json(got[1]) if got is not None else {}
                model_server = "down" if got is None else answer.get("status", "ok")
                model_reason = "the model server does not answer" if got is None else answer.get("reason")
                continue
            if got is None:
                frontends.append({"index": index, "status": self._absent(index)})
                continue
            body = _json(got[1])
            body0 = body0 or body
            sessions += int(body.get("sessions", 0))
            frontends.append({"index": index, "status": body.get("status", "ok"), "sessions": body.get("sessions", 0),
                              **({"reason": body["reason"]} if body.get("reason") else {})})
        up = [f for f in frontends if f["status"] == "ok"]
        reason = None
        if model_server not in (None, "ok"):
            reason = f"model server {model_server}: {model_reason or 'no answer can be produced'}"
        elif not up:
            reason = "no frontend can answer: " + ", ".join(
                f"frontend {f['index']} {f['status']}" + (f" ({f['reason']})" if f.get("reason") else "")
                for f in frontends)
        status = "unavailable" if reason else "ok" if len(up) == len(frontends) else "degraded"
        body = {"status": status, "sessions": sessions, "model": body0.get("model", ""),
                "plugins": body0.get("plugins", {}), "frontends": frontends}
        if reason is not None:
            body["reason"] = reason
        if model_server is not None:
            body["model_server"] = model_server
        return web.json_response(body, status=503 if reason else 200)

    def _absent(self, index: int) -> str:
        """A frontend that does not answer: "starting" before its socket exists (the supervisor
        removes a dead one's socket when it starts the next), else "down"."""
        return "down" if os.path.exists(self.info.socket(index)) else "starting"

    async def metrics(self, request: web.Request) -> web.Response:
        got_all = await self._gather("/metrics", self._headers(request))
        texts = {i: got[1].decode() for i, got in got_all if isinstance(i, int) and got is not None and got[0] == 200}
        model = next((got[1].decode() for i, got in got_all if isinstance(i, str) and got is not None), None)
        if not texts:
            return error(503, "no frontend answered")
        return web.Response(text=merge_metrics(texts, self.info.count, model),
                            content_type="text/plain", charset="utf-8")


def merge_metrics(texts: dict[int, str], count: int, model_server: str | None = None) -> str:
    """Prometheus text of several processes as one: samples with the same name and labels are
    summed; `PER_PROCESS` families keep one sample per frontend (label `frontend`). The model
    server's families are added where no frontend has one of that name (the frontends' own
    view of the backend, e.g. requests in flight from them, is kept)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    sources: list[tuple[int | None, str]] = [*sorted(texts.items()), *([(None, model_server)] if model_server else [])]
    frontend_names: set[str] = set()
    for index, text in sources:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue  # creation times, not amounts
            if index is None and family.name in frontend_names:
                continue
            if index is not None:
                frontend_names.add(family.name)
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # a creation time, not an amount
                labels = dict(s.labels)
                if family.name in PER_PROCESS:
                    labels["frontend"] = str(index)
                key = (s.name, tuple(sorted(labels.items())))
                samples[key] = samples.get(key, 0.0) + s.value
    lines = ["# HELP voice_agent_frontends Frontend processes of this server, by state",
             "# TYPE voice_agent_frontends gauge",
             f'voice_agent_frontends{{state="up"}} {float(len(texts))}',
             f'voice_agent_frontends{{state="down"}} {float(count - len(texts))}']
    for name, (kind, doc, samples) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for (sample, pairs), value in samples.items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
            lines.append(f"{sample}{{{label_text}}} {value!r}" if label_text else f"{sample} {value!r}")
    return "\n".join(lines) + "\n"


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
