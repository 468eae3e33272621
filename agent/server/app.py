"""`voice-agent serve`: the aiohttp application and its lifecycle.

Endpoints: `/` playground, `POST /v1/sessions` (WebRTC offer/answer, JSON), `POST /whip` +
`DELETE /whip/{id}` (RFC 9725), `GET /v1/sessions/{id}/events` (WebSocket), `/healthz` = `/readyz`
(503 while no answer can be produced), `/livez`, `/metrics`. Every error answer is JSON
`{"error": reason}` (WHIP bodies are SDP).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.config import ServerSettings, Settings
from agent.heap import freeze_startup
from agent.runtime import AgentRuntime
from agent.server import routes
from agent.server.metrics import Metrics
from agent.server.middleware import bearer_auth, json_errors
from agent.server.routes import MANAGER, SETTINGS, WEBSOCKETS, error
from agent.server.secrets import redact_access_log
from agent.transports.webrtc import PeerManager, is_loopback, use_loopback_candidates

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RUNTIME: web.AppKey[AgentRuntime] = web.AppKey("runtime", AgentRuntime)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def cors_middleware(settings: ServerSettings) -> Any:
    allowed = set(settings.cors_origins)

    def allow(origin: str | None) -> bool:
        return origin is not None and ("*" in allowed or origin in allowed)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS":
            if "Access-Control-Request-Method" in request.headers and not allow(origin):
                return error(403, f"origin {origin} is not allowed (server.cors_origins)")
            response: web.StreamResponse = web.Response(status=204, headers={
                "Allow": "GET, POST, DELETE, PATCH, OPTIONS",
                "Accept-Post": "application/sdp, application/json"})
        else:
            response = await handler(request)
        if allow(origin) and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin or "*"
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = "Location, Link"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, PATCH, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
                response.headers["Access-Control-Max-Age"] = "600"
        return response

    return cors


def _render(status: int, reason: str, code: str, headers: dict[str, str]) -> web.Response:
    return error(status, reason, **headers)


async def healthz(request: web.Request) -> web.Response:
    """Readiness (`/healthz`, `/readyz`): 200 while an answer can be produced, else 503 with the
    reason — the same body and rule as the aggregated one of `serve --processes N`."""
    runtime = request.app[RUNTIME]
    # A failed plugin does not make the agent unhealthy (it still answers); it is shown here so
    # an operator sees it without reading the log.
    plugins = runtime.plugins.status() if runtime.plugins is not None else {}
    reason = unavailable_reason(runtime.backend)
    body = {"status": "ok" if reason is None else "unavailable", "sessions": len(request.app[MANAGER].peers),
            "model": getattr(runtime.backend, "model_name", ""),
            "warning": getattr(runtime.backend, "warning", None), "plugins": plugins}
    if reason is not None:
        body["reason"] = reason
    return web.json_response(body, status=200 if reason is None else 503)


def unavailable_reason(backend: Any) -> str | None:
    """Why `backend` cannot answer now (no worker, server unreachable), None when it can."""
    if getattr(backend, "healthy", True):
        return None
    return getattr(backend, "health_reason", None) or f"the {getattr(backend, 'name', 'inference')} backend is down"


async def livez(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP (a restart would not help a backend that is down)."""
    return web.json_response({"status": "alive"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(runtime: AgentRuntime, settings: Settings | ServerSettings) -> web.Application:
    """The server for a started (or soon started) runtime; closing the runtime is the caller's job."""
    server = settings.server if isinstance(settings, Settings) else settings
    redact_access_log()  # `-v` logs request lines: `?token=` is redacted in them
    app = web.Application(client_max_size=server.max_body_bytes,
                          middlewares=[json_errors(_render), cors_middleware(server),
                                       # GET: browsers cannot set headers on page loads and WebSockets
                                       bearer_auth(server.token, _render, query_token_methods={"GET"})])
    manager = PeerManager(runtime, server)
    app[RUNTIME] = runtime
    app[SETTINGS] = server
    app[MANAGER] = manager
    app[WEBSOCKETS] = set()
    app[METRICS] = stats = Metrics(runtime, lambda: len(manager.peers))
    manager.on_dropped = stats.audio_dropped.inc
    runtime.bus.add_listener(stats.on_event)

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/sessions", routes.create_session)
    app.router.add_get("/v1/sessions/{id}/events", routes.session_events)
    app.router.add_post("/whip", routes.whip_post)
    app.router.add_delete("/whip/{id}", routes.whip_delete)
    app.router.add_patch("/whip/{id}", routes.whip_patch)

    async def on_shutdown(app: web.Application) -> None:
        await manager.close_all("shutdown")
        sockets: set[web.WebSocketResponse] = app[WEBSOCKETS]
        for ws in list(sockets):
            await ws.close()

    app.on_shutdown.append(on_shutdown)
    return app


def port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (in use, no such address), or None: checked before
    the model loads. A bind with SO_REUSEADDR, as aiohttp's own, released at once."""
    if port == 0:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        return f"voice-agent: cannot listen on {host}:{port}: {reason} (another port: --port N)"
    return None


async def serve(settings: Settings, runtime_options: dict[str, Any] | None = None, frontend: Any = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 2 when something cannot start.
    `frontend`: an `agent.server.router.Router` when this is one of `serve --processes N`."""
    server = settings.server
    inherited = frontend.info.listen_fd if frontend is not None else None  # the supervisor's socket
    if server.http and inherited is None and (busy := port_taken(server.host, server.port)):
        print(busy, file=sys.stderr)  # now, not after the model has loaded
        return 2
    try:
        runtime = AgentRuntime(settings, **(runtime_options or {}))
        if frontend is not None:
            frontend.attach_runtime(runtime)
        await runtime.start()
    except Exception as exc:
        print(f"voice-agent: cannot start the runtime: {exc}", file=sys.stderr)
        if "runtime" in locals():
            await _quietly(runtime.close())
        return 2
    if not server.http and not settings.wyoming:
        print("voice-agent: nothing to serve: HTTP is off and no Wyoming URI is set", file=sys.stderr)
        await _quietly(runtime.close())
        return 2
    ready: list[str] = []  # printed once the signal handlers are in place: a stop is then clean
    wyoming = None
    if settings.wyoming:
        from agent.transports.wyoming import WyomingServer

        try:
            wyoming = WyomingServer(runtime, settings.wyoming)
            await wyoming.start()
        except (OSError, ValueError) as exc:
            print(f"voice-agent: cannot serve Wyoming on {settings.wyoming}: {exc}", file=sys.stderr)
            await _quietly(runtime.close())
            return 2
        ready.append(f"voice-agent: Wyoming on {wyoming.uri} (model {runtime.backend.model_name})")
    runner = None
    if server.http:
        if not server.ice_servers and is_loopback(server.host):
            use_loopback_candidates()  # no STUN and a loopback site: keep ICE on 127.0.0.1 too
        app = create_app(runtime, settings)
        if frontend is not None:
            frontend.attach_app(app)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        try:
            site: web.BaseSite = (web.SockSite(runner, socket.socket(fileno=inherited)) if inherited is not None
                                  else web.TCPSite(runner, server.host, server.port))
            await site.start()
            if frontend is not None:
                await frontend.site(runner).start()
        except OSError as exc:
            print(f"voice-agent: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}"
                  " (another port: --port N)", file=sys.stderr)
            await runner.cleanup()
            if wyoming is not None:
                await _quietly(wyoming.stop())
            await _quietly(runtime.close())
            return 2
        port = runner.addresses[0][1] if runner.addresses else server.port
        # One of several frontends: the supervisor says "serving" once all of them are up.
        what = "serving" if frontend is None else f"frontend {frontend.info.index}"
        ready.append(f"voice-agent: {what} on http://{server.host}:{port}/ (model {runtime.backend.model_name})")
    if frontend is not None:
        frontend.announce_lost(runtime)
    freeze_startup()  # what lives as long as the process stays out of later collections (agent/heap.py)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("\n".join(ready), file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if wyoming is not None:
            await _quietly(wyoming.stop())
        if runner is not None:
            await runner.cleanup()
        await _quietly(runtime.close())
    return 0


async def _quietly(coro: Awaitable[Any]) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("shutdown step failed: %s", exc)
