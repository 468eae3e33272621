"""The server against hostile input (issue 15, items 7–9): each case answered 4xx or an `error`
event, never a 500 or a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest

from agent.runtime import AgentRuntime
from tests.rtc_util import MuteTrack, connect
from tests.test_server import Server, http, runtime, server, start_server, until  # noqa: F401  (fixtures)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def raw_request(url: str, head: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (clients refuse to send non-UTF-8 headers)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1]


async def test_a_non_utf8_authorization_header_is_401_without_a_traceback(
        runtime: AgentRuntime, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    srv = await start_server(runtime, token="s3cret")
    try:
        caplog.set_level(logging.ERROR)
        for head in (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n",
                     b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cr\xe9t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                     b"GET /?token=%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            status, body = await raw_request(srv.url, head)
            assert status == 401 and b"invalid bearer token" in body, (status, body)
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        await srv.runner.cleanup()


@pytest.mark.parametrize("body, reason", [
    ('{"type": "offer", "sdp": ' + "[" * 60000, "nested too deeply"),
    ('{"type": "offer", "sdp": "v=0", "n": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
    (b'{"type": "offer", "sdp": "\xff"}', "body is not valid JSON"),
])
async def test_malformed_offers_are_400_with_a_reason(server: Server, http: aiohttp.ClientSession,  # noqa: F811
                                                      body: str | bytes, reason: str) -> None:
    async with http.post(f"{server.url}/v1/sessions", data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and reason in (await r.json())["error"]


async def test_bad_websocket_commands_become_errors_and_change_nothing(
        server: Server, http: aiohttp.ClientSession) -> None:  # noqa: F811
    client = await connect(server.url, MuteTrack())
    session = server.runtime.sessions[client.session_id]
    before = (session.conversation.system_prompt, session.max_new_tokens)
    async with http.ws_connect(f"{server.url}/v1/sessions/{client.session_id}/events") as ws:
        assert json.loads((await ws.receive()).data)["type"] == "session.started"
        sent = ['{"type": "session.update", "max_new_tokens": ' + "[" * 60000,
                '{"type": "session.update", "max_new_tokens": ' + "9" * 5000 + "}",
                '{"type": "session.update", "max_new_tokens": true}',
                '{"type": "session.update", "min_silence_s": false}',
                json.dumps({"type": "session.update", "system_prompt": "x" * 12_000, "max_new_tokens": 5})]
        for message in sent:
            await ws.send_str(message)
        errors: list[dict[str, Any]] = []
        while len(errors) < len(sent):
            event = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
            if event["type"] == "error":
                errors.append(event)
    assert [e["code"] for e in errors] == ["bad_command"] * 4 + ["bad_request"]
    assert "max_new_tokens: Input should be a valid integer" in errors[2]["message"]
    assert "min_silence_s: Input should be a valid number" in errors[3]["message"]
    assert "system prompt of 12000 tokens is over the limit of 3000" in errors[4]["message"]
    # the refused update applied nothing, not even its valid max_new_tokens
    assert (session.conversation.system_prompt, session.max_new_tokens) == before
    await client.close()
    await until(lambda: not server.runtime.sessions)
