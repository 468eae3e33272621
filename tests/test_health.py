"""Health that tells the truth, the same in both modes: `/healthz` (= `/readyz`) is 503 with the
reason whenever no answer can be produced; `/livez` is 200 while the process serves."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.config import load_settings
from agent.inference.openai import OpenAIBackend
from agent.inference.pool import InferencePool
from agent.runtime import AgentRuntime
from agent.server.app import create_app
from agent.server.model_server import ModelServer
from agent.server.router import FrontendInfo, Router
from tests.rtc_util import loopback_only

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with http.get(url) as r:
        return r.status, await r.json()


async def test_no_worker_behind_the_model_server_is_503_in_both_modes(tmp_path: Path) -> None:
    """A model server whose pool has no worker: one process (`--backend openai` at it) and the
    aggregated view of `--processes N` both answer 503 with the reason; a frontend that has not
    opened its socket yet reads "starting"; `/livez` stays 200 and needs no token."""
    settings = load_settings(None, model="tiny-random")
    model = ModelServer(InferencePool("tiny-random", workers=1), settings)  # never started: no worker
    model_runner = model.runner()
    await model_runner.setup()
    sock = str(tmp_path / "model.sock")
    await web.UnixSite(model_runner, sock).start()
    backend = OpenAIBackend(f"unix://{sock}", "tiny-random", health_interval_s=0.2)
    runtime = AgentRuntime(load_settings(None, model="tiny-random", server={"token": "s3cret"}), backend=backend)
    await runtime.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    info = FrontendInfo(0, 2, str(tmp_path), 4, port, openai_url=f"unix://{sock}")
    runners = []
    try:
        single = web.AppRunner(create_app(runtime, runtime.settings))
        runners.append(single)
        await single.setup()
        await web.TCPSite(single, "127.0.0.1", 0).start()
        router = Router(info)
        app = create_app(runtime, runtime.settings)
        router.attach_app(app)
        multi = web.AppRunner(app)
        runners.append(multi)
        await multi.setup()
        await web.TCPSite(multi, "127.0.0.1", port).start()
        await router.site(multi).start()
        async with aiohttp.ClientSession() as http:
            one = f"http://127.0.0.1:{single.addresses[0][1]}"
            status, body = await _get(http, f"{one}/healthz")
            assert status == 503 and body["status"] == "unavailable", body
            assert "no inference worker" in str(body["reason"]) or "not running" in str(body["reason"]), body
            assert await _get(http, f"{one}/readyz") == (status, body)
            assert (await _get(http, f"{one}/livez"))[0] == 200

            many = f"http://127.0.0.1:{port}"
            status, body = await _get(http, f"{many}/healthz")
            assert status == 503 and body["status"] == "unavailable", body
            assert body["model_server"] == "unavailable" and "model server" in str(body["reason"]), body
            frontends = {f["index"]: f["status"] for f in body["frontends"]}  # type: ignore[union-attr]
            assert frontends == {0: "unavailable", 1: "starting"}, body
            assert (await _get(http, f"{many}/readyz"))[0] == 503
            assert (await _get(http, f"{many}/livez"))[0] == 200
            # the model server itself: the same answer, and alive
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as local:
                status, body = await _get(local, "http://model/readyz")
                assert status == 503 and body["reason"], body
                assert (await _get(local, "http://model/livez"))[0] == 200
    finally:
        for runner in runners:
            await runner.cleanup()
        await runtime.close()
        await model_runner.cleanup()
