"""aiortc test clients: loopback-only ICE, real-time audio tracks, the `events` data channel."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.bench.track import PacedTrack

BufferTrack = PacedTrack  # the microphone of the tests: real-time frames of a buffer, then silence (or looped)


def loopback_only(monkeypatch: Any) -> None:
    """Host candidates on 127.0.0.1 only (no STUN is configured either): nothing leaves the host."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"])


class MuteTrack(MediaStreamTrack):
    """A negotiated microphone that never sends a frame (no-audio timeout tests)."""

    kind = "audio"

    async def recv(self) -> av.AudioFrame:
        while self.readyState == "live":
            await asyncio.sleep(0.1)
        raise MediaStreamError


class RtcClient:
    def __init__(self, pc: RTCPeerConnection, channel: Any) -> None:
        self.pc = pc
        self.channel = channel
        self.session_id = ""
        self.location: str | None = None
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        channel.on("message", self._on_message)

    def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        self._changed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Events of `kind` once `count` have arrived (the timeout only guards against hangs)."""
        async def until() -> list[dict[str, Any]]:
            while len(self.of_type(kind)) < count:
                self._changed.clear()
                await self._changed.wait()
            return self.of_type(kind)

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            seen = [e["type"] for e in self.events]
            raise AssertionError(f"no {count}× {kind} within {timeout} s; events: {seen}") from None

    def send(self, command: dict[str, Any] | str) -> None:
        self.channel.send(command if isinstance(command, str) else json.dumps(command))

    async def wait_open(self, timeout: float = 30.0) -> None:
        async def until() -> None:
            while self.channel.readyState != "open":
                await asyncio.sleep(0.02)

        await asyncio.wait_for(until(), timeout)

    async def wait_connected(self, timeout: float = 30.0) -> None:
        async def until() -> None:
            while self.pc.connectionState != "connected":
                if self.pc.connectionState in ("failed", "closed"):
                    raise AssertionError(f"peer connection {self.pc.connectionState}")
                await asyncio.sleep(0.02)

        await asyncio.wait_for(until(), timeout)

    async def close(self) -> None:
        await self.pc.close()


async def offer(track: MediaStreamTrack | None, with_channel: bool = True) -> tuple[RTCPeerConnection, Any]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("events") if with_channel else None
    if track is not None:
        pc.addTrack(track)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, channel


async def connect(base_url: str, track: MediaStreamTrack, *, token: str | None = None,
                  http: aiohttp.ClientSession | None = None, wait: bool = True) -> RtcClient:
    """POST /v1/sessions with a fresh offer; with `wait`, the client is connected (ICE + DTLS)
    when this returns."""
    pc, channel = await offer(track)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    own = http is None
    http = http or aiohttp.ClientSession()
    try:
        async with http.post(f"{base_url}/v1/sessions", headers=headers,
                             json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
            body = await r.json()
            if r.status != 200:
                await pc.close()
                raise AssertionError(f"POST /v1/sessions: {r.status} {body}")
    finally:
        if own:
            await http.close()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    client = RtcClient(pc, channel)
    client.session_id = body["session_id"]
    if wait:
        await client.wait_connected()
    return client
