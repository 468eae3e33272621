"""HTTP handlers: WebRTC offer/answer (JSON), WHIP (RFC 9725), the WebSocket event stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import WSMsgType, web

from agent.config import ServerSettings
from agent.transports.webrtc import TASK_PREFIX, CapacityError, OfferError, Peer, PeerManager

MANAGER: web.AppKey[PeerManager] = web.AppKey("peers", PeerManager)
SETTINGS: web.AppKey[ServerSettings] = web.AppKey("server_settings", ServerSettings)
WEBSOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("websockets", set)


def error(status: int, reason: str, **headers: str) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers or None)


async def read_body(request: web.Request, *content_types: str) -> bytes | web.Response:
    """The body, or the 4xx answer that explains why not."""
    if request.content_type not in content_types:
        got = request.content_type or "none"
        return error(415, f"Content-Type must be {' or '.join(content_types)} (got {got})")
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return error(413, f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"body exceeds the limit of {limit} bytes")
    if not body:
        return error(400, "empty body: expected an SDP offer")
    return body


def parse_json(body: bytes) -> Any:
    """The decoded body, or a 400 that says why not. Besides syntax errors, json refuses
    deep nesting (RecursionError) and integers over 4300 digits (ValueError): both are the
    client's fault, never a 500."""
    try:
        return json.loads(body)
    except RecursionError:
        return error(400, "body is not valid JSON: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        return error(400, f"body is not valid JSON: {str(exc)[:200]}")


async def _answer(request: web.Request, sdp: str, sdp_type: str = "offer",
                  speak: bool = True) -> tuple[Peer, str] | web.Response:
    try:
        return await request.app[MANAGER].create(sdp, sdp_type, speak=speak)
    except CapacityError as exc:
        return error(503, str(exc), **{"Retry-After": "5"})
    except OfferError as exc:
        return error(400, str(exc))


# ---- POST /v1/sessions ----------------------------------------------------------------
async def create_session(request: web.Request) -> web.Response:
    body = await read_body(request, "application/json")
    if isinstance(body, web.Response):
        return body
    data = parse_json(body)
    if isinstance(data, web.Response):
        return data
    if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
        return error(400, 'expected a JSON object {"type": "offer", "sdp": "..."}')
    sdp_type = data.get("type", "offer")
    if not isinstance(sdp_type, str):
        return error(400, "type must be the string 'offer'")
    result = await _answer(request, data["sdp"], sdp_type)
    if isinstance(result, web.Response):
        return result
    peer, answer = result
    return web.json_response({"type": "answer", "sdp": answer, "session_id": peer.id})


# ---- WHIP -----------------------------------------------------------------------------
async def whip_post(request: web.Request) -> web.Response:
    body = await read_body(request, "application/sdp")
    if isinstance(body, web.Response):
        return body
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        return error(400, "SDP offer is not UTF-8 text")
    result = await _answer(request, sdp, speak=False)  # WHIP is ingest-only
    if isinstance(result, web.Response):
        return result
    peer, answer = result
    location = f"/whip/{peer.id}"
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": location,
                                 "Link": f'</v1/sessions/{peer.id}/events>; rel="events"'})


async def whip_delete(request: web.Request) -> web.Response:
    peer = request.app[MANAGER].peers.get(request.match_info["id"])
    if peer is None:
        return error(404, "no such WHIP session")
    await peer.close("client")
    return web.Response(status=200)


async def whip_patch(request: web.Request) -> web.Response:
    # RFC 9725 §4.3.1: a server without trickle ICE / ICE restarts answers 405.
    return error(405, "trickle ICE and ICE restarts are not supported: send a complete offer",
                 Allow="DELETE, OPTIONS")


# ---- WebSocket events -----------------------------------------------------------------
async def session_events(request: web.Request) -> web.StreamResponse:
    peer = request.app[MANAGER].peers.get(request.match_info["id"])
    if peer is None or peer.closed:
        return error(404, "no such session")
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    sub = request.app[MANAGER].runtime.bus.subscribe(peer.id)

    async def pump() -> None:
        if peer.started_event is not None:
            await ws.send_str(peer.started_event.model_dump_json())
        if peer.closed:  # ended while we subscribed: its session.ended is gone
            await ws.close()
            return
        async for event in sub:
            await ws.send_str(event.model_dump_json())
            if event.type == "session.ended":
                break
        await ws.close()

    task = asyncio.create_task(pump(), name=f"{TASK_PREFIX}ws-{peer.id}")
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await peer.command(msg.data)
            elif msg.type == WSMsgType.BINARY:
                peer.session.report_error("bad_command", "commands are JSON text messages, not binary")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sub.close()
        request.app[WEBSOCKETS].discard(ws)
    return ws
