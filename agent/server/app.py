"""`voice-agent serve`: the aiohttp application and its lifecycle.

Endpoints: `/` playground, `POST /v1/sessions` (WebRTC offer/answer, JSON), `POST /whip` +
`DELETE /whip/{id}` (RFC 9725), `GET /v1/sessions/{id}/events` (WebSocket), `/healthz`,
`/metrics`. Every error answer is JSON `{"error": reason}` (WHIP bodies are SDP).
"""

from __future__ import annotations

import asyncio
import hmac
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
from agent.server.routes import MANAGER, SETTINGS, WEBSOCKETS, error
from agent.server.secrets import redact_access_log
from agent.transports.webrtc import PeerManager, is_loopback, use_loopback_candidates

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RUNTIME: web.AppKey[AgentRuntime] = web.AppKey("runtime", AgentRuntime)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = {"/healthz"}
QUERY_TOKEN_OK = "GET"  # browsers cannot set headers on page loads and WebSockets


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reasons = {404: f"no such endpoint: {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: "request body too large"}
        reason = reasons.get(exc.status) or exc.text or exc.reason
        return error(exc.status, reason)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug must answer 500, not drop the connection
        log.exception("%s %s failed", request.method, request.path)
        return error(500, f"internal error: {type(exc).__name__}")


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


def auth_middleware(token: str | None) -> Any:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or request.path in PUBLIC or request.method == "OPTIONS":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given: str | None = header[7:].strip() if header[:7].lower() == "bearer " else None
        if given is None and request.method == QUERY_TOKEN_OK:
            given = request.query.get("token")
        challenge = {"WWW-Authenticate": 'Bearer realm="voice-agent"'}
        if not given:
            return error(401, "missing bearer token: send 'Authorization: Bearer <token>'", **challenge)
        if not hmac.compare_digest(_raw_bytes(given), token.encode()):
            return error(401, "invalid bearer token", **challenge)
        return await handler(request)

    return auth


def _raw_bytes(text: str) -> bytes:
    """Bytes to compare, for any header: aiohttp decodes a non-UTF-8 byte as a lone
    surrogate, which plain `.encode()` refuses (that was a 500 before authentication).
    Such a value can never equal a UTF-8 token, so `surrogatepass` is enough."""
    return text.encode("utf-8", "surrogatepass")


async def healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    # A failed plugin does not make the agent unhealthy (it still answers); it is shown here so
    # an operator sees it without reading the log.
    plugins = runtime.plugins.status() if runtime.plugins is not None else {}
    healthy = getattr(runtime.backend, "healthy", True)  # False: no inference worker is running
    return web.json_response({"status": "ok" if healthy else "unavailable", "sessions": len(request.app[MANAGER].peers),
                              "model": getattr(runtime.backend, "model_name", ""),
                              "warning": getattr(runtime.backend, "warning", None), "plugins": plugins},
                             status=200 if healthy else 503)


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
                          middlewares=[json_errors, cors_middleware(server), auth_middleware(server.token)])
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


def port_taken(host: str, port: int, reuse_port: bool = False) -> str | None:
    """Why `host:port` cannot be listened on (in use, no such address), or None: checked before
    the model loads. A bind with SO_REUSEADDR, as aiohttp's own, released at once; with
    `reuse_port` (the frontends of `serve --processes N` share the port) SO_REUSEPORT too."""
    if port == 0:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(address)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        return f"voice-agent: cannot listen on {host}:{port}: {reason} (another port: --port N)"
    return None


async def serve(settings: Settings, runtime_options: dict[str, Any] | None = None, frontend: Any = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 2 when something cannot start.
    `frontend`: an `agent.server.router.Router` when this is one of `serve --processes N`."""
    server = settings.server
    if server.http and (busy := port_taken(server.host, server.port, reuse_port=frontend is not None)):
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
            site = web.TCPSite(runner, server.host, server.port, reuse_port=frontend is not None)
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
