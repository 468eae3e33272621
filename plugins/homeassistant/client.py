"""A small Home Assistant client: REST for states and services, WebSocket for state changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class HomeAssistantError(Exception):
    """A request that failed; the message is meant for the model and the log."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # HA's HTTP status, when it answered


class HomeAssistantClient:
    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                               headers={"Authorization": f"Bearer {self.token}"})
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _request(self, method: str, path: str, json: Any = None) -> Any:
        try:
            async with self.http.request(method, f"{self.url}{path}", json=json) as resp:
                if resp.status == 401:
                    raise HomeAssistantError("Home Assistant rejected the access token (401)", 401)
                if resp.status == 404:
                    raise HomeAssistantError(f"Home Assistant has no {path} (404)", 404)
                if resp.status >= 400:
                    text = (await resp.text())[:200]
                    raise HomeAssistantError(f"Home Assistant answered {resp.status} to {method} {path}: {text}",
                                             resp.status)
                return await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise HomeAssistantError(f"Home Assistant unreachable at {self.url}: {type(exc).__name__}: {exc}") from None

    async def states(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "/api/states")
        if not isinstance(data, list):
            raise HomeAssistantError("unexpected answer from /api/states")
        return data

    async def state(self, entity_id: str) -> dict[str, Any]:
        try:
            return await self._request("GET", f"/api/states/{entity_id}")
        except HomeAssistantError as exc:
            if exc.status == 404:
                raise HomeAssistantError(f"Home Assistant has no entity {entity_id} (404)") from None
            raise

    async def call_service(self, domain: str, service: str, data: dict[str, Any]) -> Any:
        return await self._request("POST", f"/api/services/{domain}/{service}", json=data)

    async def watch(self, on_state: Callable[[dict[str, Any]], None],
                    on_ready: Callable[[], Awaitable[None]] | None = None,
                    backoff_max: float = 30.0, on_removed: Callable[[str], None] | None = None) -> None:
        """Follow `state_changed` events over the WebSocket API forever, reconnecting.

        `on_ready` is awaited after each (re)subscription, before any event is handed on: a
        snapshot taken there (REST) is then only ever followed by newer changes."""
        backoff = 0.5
        while True:
            try:
                await self._watch_once(on_state, on_ready, on_removed)
                backoff = 0.5
            except HomeAssistantError as exc:
                log.warning("homeassistant: websocket: %s; retrying in %.0f s", exc, backoff)
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                log.warning("homeassistant: websocket lost (%s); retrying in %.0f s", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff_max, backoff * 2)

    async def _watch_once(self, on_state: Callable[[dict[str, Any]], None],
                          on_ready: Callable[[], Awaitable[None]] | None,
                          on_removed: Callable[[str], None] | None = None) -> None:
        ws_url = self.url.replace("http", "ws", 1) + "/api/websocket"
        async with self.http.ws_connect(ws_url, heartbeat=30) as ws:
            hello = await ws.receive_json(timeout=self.timeout)
            if hello.get("type") != "auth_required":
                raise HomeAssistantError(f"unexpected websocket greeting {hello.get('type')!r}")
            await ws.send_json({"type": "auth", "access_token": self.token})
            answer = await ws.receive_json(timeout=self.timeout)
            if answer.get("type") != "auth_ok":
                raise HomeAssistantError(f"websocket authentication failed: {answer.get('message', answer.get('type'))}")
            await ws.send_json({"id": 1, "type": "subscribe_events", "event_type": "state_changed"})
            # Ready once HA confirms the subscription: a change made before that is not sent to us.
            subscribed = await ws.receive_json(timeout=self.timeout)
            if subscribed.get("id") != 1 or not subscribed.get("success"):
                raise HomeAssistantError(f"websocket subscription failed: {subscribed.get('error', subscribed)}")
            if on_ready is not None:
                await on_ready()
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = msg.json()
                if data.get("type") == "event":
                    event_data = data.get("event", {}).get("data", {})
                    new_state = event_data.get("new_state")
                    if isinstance(new_state, dict):
                        on_state(new_state)
                    elif new_state is None and on_removed is not None and isinstance(event_data.get("entity_id"), str):
                        on_removed(event_data["entity_id"])  # HA removed the entity: new_state is null
                elif data.get("type") == "result" and not data.get("success", True):
                    raise HomeAssistantError(f"websocket request failed: {data.get('error')}")
