"""A local aiohttp server speaking the parts of the Home Assistant API the plugin uses:
`GET /api/states[/<entity_id>]`, `POST /api/services/<domain>/<service>`, and the
authenticated `/api/websocket` with `state_changed` events."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSMsgType, web

from tests.mosquitto import free_port

TOKEN = "long-lived-token"


class FakeHA:
    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {
            "light.kitchen": {"entity_id": "light.kitchen", "state": "off",
                              "attributes": {"friendly_name": "Kitchen", "brightness": None}},
            "climate.hall": {"entity_id": "climate.hall", "state": "heat",
                             "attributes": {"friendly_name": "Hall", "temperature": 19}},
            "lock.front_door": {"entity_id": "lock.front_door", "state": "locked", "attributes": {}},
            "switch.fan": {"entity_id": "switch.fan", "state": "off", "attributes": {}},
        }
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.state_reads = 0  # authorised GET /api/states

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def get_states(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return web.json_response({"message": "unauthorized"}, status=401)
        self.state_reads += 1
        return web.json_response(list(self.states.values()))

    async def get_state(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return web.json_response({"message": "unauthorized"}, status=401)
        state = self.states.get(request.match_info["entity_id"])
        return web.json_response(state) if state else web.json_response({"message": "not found"}, status=404)

    async def service(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return web.json_response({"message": "unauthorized"}, status=401)
        domain, service = request.match_info["domain"], request.match_info["service"]
        data = await request.json()
        self.calls.append((domain, service, data))
        state = self.states.get(data["entity_id"])
        if state is None:
            return web.json_response([])  # as real Home Assistant: 200, and nothing is done
        if service in ("turn_on", "turn_off"):
            await self.push_state(data["entity_id"], service.removeprefix("turn_"))  # as HA does
        return web.json_response([state])

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "auth_required", "ha_version": "2025.1.0"})
        auth = await ws.receive_json()
        if auth.get("access_token") != TOKEN:
            await ws.send_json({"type": "auth_invalid", "message": "Invalid access token"})
            await ws.close()
            return ws
        await ws.send_json({"type": "auth_ok", "ha_version": "2025.1.0"})
        self.sockets.append(ws)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = json.loads(msg.data)
                await ws.send_json({"id": data["id"], "type": "result", "success": True, "result": None})
        return ws

    async def push_state(self, entity_id: str, state: str) -> None:
        self.states[entity_id]["state"] = state
        for ws in [ws for ws in self.sockets if not ws.closed]:
            await ws.send_json({"id": 1, "type": "event", "event": {"event_type": "state_changed", "data": {
                "entity_id": entity_id, "new_state": self.states[entity_id]}}})


@contextlib.asynccontextmanager
async def running_fake_ha() -> AsyncIterator[tuple[FakeHA, str]]:
    """Yields the fake and its base URL (http://127.0.0.1:<free port>)."""
    fake = FakeHA()
    app = web.Application()
    app.router.add_get("/api/states", fake.get_states)
    app.router.add_get("/api/states/{entity_id}", fake.get_state)
    app.router.add_post("/api/services/{domain}/{service}", fake.service)
    app.router.add_get("/api/websocket", fake.websocket)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        for ws in fake.sockets:
            await ws.close()
        await runner.cleanup()
