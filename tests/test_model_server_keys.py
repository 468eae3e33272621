"""`serve-model` with several clients on one pool: conversation keys belong to the credential
that made them; Unix sockets private to the server's user; tokens out of `ps` and access logs."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from agent.cli import main as cli_main
from agent.config import load_settings
from agent.inference.pool import InferencePool
from agent.model.qwen2_audio import audio_base64
from agent.server import frontends, secrets
from agent.server.model_server import ModelServer, run_model_server
from agent.server.model_wire import CONVERSATION_HEADER, ConversationKeys
from agent.server.secrets import SecretError, tenant_of

aio = pytest.mark.asyncio(loop_scope="session")

ALICE, BOB = "alice-token", "bob-token"
GUARD = 60


def noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * 16000)).astype(np.float32)


def user(seed: int) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": audio_base64(noise(0.6, seed)), "format": "wav"}}]}


class Site:
    def __init__(self, server: ModelServer, url: str) -> None:
        self.server, self.url = server, url

    async def ask(self, token: str, key: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}", CONVERSATION_HEADER: key}
        async with aiohttp.ClientSession(headers=headers) as http, http.post(
                f"{self.url}/v1/chat/completions", json={"model": "tiny-random", "max_tokens": 3,
                                                         "messages": messages}) as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
            return body

    async def call(self, method: str, token: str, path: str) -> int:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
                http.request(method, f"{self.url}{path}") as r:
            return r.status


async def start(server: ModelServer) -> tuple[web.AppRunner, Site]:
    runner = server.runner()
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, Site(server, f"http://127.0.0.1:{runner.addresses[0][1]}")


@pytest.fixture(scope="module")
async def pooled() -> AsyncIterator[Site]:
    settings = load_settings(None, model="tiny-random", max_new_tokens=4, workers=1, max_batch=4)
    pool = InferencePool(settings.model, workers=1, max_batch=4, max_queue=8)
    await pool.start()
    runner, site = await start(ModelServer(pool, settings, tokens=[ALICE, BOB]))
    yield site
    await runner.cleanup()
    await pool.close()


def cached(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


@aio
async def test_a_second_client_cannot_probe_or_forget_the_first_ones_conversation(pooled: Site) -> None:
    first = [user(1)]
    a1 = await asyncio.wait_for(pooled.ask(ALICE, "room-1", first), GUARD)
    second = [*first, {"role": "assistant", "content": a1["choices"][0]["message"]["content"]}, user(2)]
    # Bob sends Alice's key with her prompt: a key of his own, nothing cached (on a shared key
    # namespace `cached_tokens` would tell him her conversation starts this way).
    b = await asyncio.wait_for(pooled.ask(BOB, "room-1", second), GUARD)
    assert cached(b) == 0
    # Bob forgets, drops and promotes "room-1": his own key, not Alice's.
    for method, path in (("DELETE", "/v1/conversations/room-1"), ("DELETE", "/v1/conversations/room-1/turns/t1"),
                         ("POST", "/v1/conversations/room-1/turns/t1/promote")):
        assert await pooled.call(method, BOB, path) == 204
    alice_key = pooled.server.scoped(tenant_of(ALICE), "room-1")
    assert alice_key in pooled.server.keys
    assert pooled.server.scoped(tenant_of(BOB), "room-1") not in pooled.server.keys
    a2 = await asyncio.wait_for(pooled.ask(ALICE, "room-1", second), GUARD)
    assert cached(a2) > 0  # her history is still there, reused
    assert await pooled.call("DELETE", ALICE, "/v1/conversations/room-1") == 204
    assert alice_key not in pooled.server.keys


class FakePool:
    model_name = "tiny-random"
    queue_depth = 0
    healthy = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def forget(self, key: str) -> None:
        self.calls.append(("forget", key))

    async def drop(self, key: str, turn: str) -> None:
        self.calls.append(("drop", key, turn))

    async def promote(self, key: str, turn: str) -> None:
        self.calls.append(("promote", key, turn))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@aio
async def test_drop_and_promote_reach_only_the_callers_own_keys() -> None:
    pool = FakePool()
    runner, site = await start(ModelServer(pool, load_settings(None, model="tiny-random"), tokens=[ALICE, BOB]))
    try:
        assert await site.call("DELETE", BOB, "/v1/conversations/k/turns/t9") == 204
        assert await site.call("POST", ALICE, "/v1/conversations/k/turns/t9/promote") == 204
        assert await site.call("DELETE", "nobody", "/v1/conversations/k") == 401
    finally:
        await runner.cleanup()
    bob, alice = tenant_of(BOB), tenant_of(ALICE)
    assert pool.calls == [("drop", f"{bob}/k/k", "t9"), ("promote", f"{alice}/k/k", "t9")]
    assert ALICE not in bob + alice  # the tenant names a digest, never the token


def test_a_client_opening_many_conversations_evicts_its_own() -> None:
    keys = ConversationKeys(max_keys=4, ttl_s=60, clock=lambda: 0.0)
    assert keys.touch("alice/k/1") == [] and keys.touch("bob/k/1") == []
    evicted = [k for i in range(2, 8) for k in keys.touch(f"bob/k/{i}")]
    assert "alice/k/1" in keys and evicted == ["bob/k/1", "bob/k/2", "bob/k/3", "bob/k/4"]
    assert keys.touch("alice/k/2") == ["bob/k/5"]  # Bob holds the most: his oldest goes


# ---- sockets ---------------------------------------------------------------------------------
def test_a_socket_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(SecretError, match="written by other users"):
        secrets.private_socket(str(shared / "model.sock"))
    os.chmod(shared, 0o775)  # group-writable is no better
    with pytest.raises(SecretError, match="written by other users"):
        secrets.private_socket(str(shared / "model.sock"))
    fresh = tmp_path / "new" / "dir"
    secrets.private_socket(str(fresh / "model.sock"))  # created, private
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    (fresh / "model.sock").write_text("not a socket")
    with pytest.raises(SecretError, match="not a socket"):
        secrets.private_socket(str(fresh / "model.sock"))


def test_a_path_another_user_owns_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    uid = os.getuid()
    monkeypatch.setattr(secrets.os, "getuid", lambda: uid + 4242)  # as seen by another user
    with pytest.raises(SecretError, match="another user"):
        secrets.private_socket(str(private / "model.sock"))


@aio
async def test_serve_model_refuses_a_shared_directory_before_loading(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    os.chmod(tmp_path, 0o777)
    settings = load_settings(None, model="no-such-org/never-loaded")  # loading it would fail otherwise
    assert await run_model_server(settings, f"unix://{tmp_path}/model.sock") == 2
    err = capsys.readouterr().err
    assert "written by other users" in err and "Traceback" not in err


@aio
async def test_the_socket_is_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pool = FakePool()
    monkeypatch.setattr("agent.runtime.create_backend", lambda settings: pool)
    path = tmp_path / "run" / "model.sock"
    stop = asyncio.Event()
    seen: dict[str, int] = {}

    def ready(url: str) -> None:
        seen["sock"] = stat.S_IMODE(path.stat().st_mode)
        seen["dir"] = stat.S_IMODE(path.parent.stat().st_mode)
        stop.set()

    old = os.umask(0)
    try:
        code = await asyncio.wait_for(run_model_server(load_settings(None, model="tiny-random"), f"unix://{path}",
                                                       ready=ready, stop=stop), GUARD)
    finally:
        os.umask(old)
    assert code == 0 and seen == {"sock": 0o600, "dir": 0o700} and not path.exists()


# ---- secrets ---------------------------------------------------------------------------------
def test_the_model_server_child_gets_no_token_on_its_command_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# the frontends' token\nfile-token-123\n")
    os.chmod(token_file, 0o600)
    monkeypatch.setenv("VOICE_AGENT_MODEL_SERVER__TOKEN_FILE", str(token_file))
    settings = load_settings(None, model="tiny-random")
    argv = frontends.model_server_command(settings, str(tmp_path / "model.sock"))
    assert argv is not None and "--token" not in argv and not any("file-token-123" in a for a in argv)
    assert frontends._model_server_token(settings) == "file-token-123"  # what the frontends send
    monkeypatch.setenv("VOICE_AGENT_MODEL_SERVER__TOKEN", "env-token-456")
    settings = load_settings(None, model="tiny-random")
    argv = frontends.model_server_command(settings, str(tmp_path / "model.sock"))
    assert argv is not None and not any("env-token-456" in a for a in argv)


def test_a_supervisor_run_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    made = Path(secrets.run_dir())
    assert made.parent == runtime and stat.S_IMODE(made.stat().st_mode) == 0o700
    os.chmod(runtime, 0o777)  # not private: the temporary directory's mkdtemp instead
    other = Path(secrets.run_dir())
    assert other.parent != runtime and stat.S_IMODE(other.stat().st_mode) == 0o700
    made.rmdir()
    other.rmdir()


@aio
async def test_the_token_file_serves_and_query_tokens_are_redacted_in_the_access_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = ModelServer(FakePool(), load_settings(None, model="tiny-random"),
                         tokens=secrets.read_token_file(_token_file(tmp_path, "q-s3cret\nother\n")))
    runner, site = await start(server)
    try:
        with caplog.at_level(logging.INFO, logger="aiohttp.access"):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{site.url}/v1/models?token=q-s3cret&x=1",
                                    headers={"Authorization": "Bearer other"}) as r:
                    assert r.status == 200
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("/v1/models?token=[redacted]&x=1" in line for line in lines), lines
    assert not any("q-s3cret" in line for line in lines)
    assert secrets.redact('"Authorization: Bearer abc.def"') == '"Authorization: Bearer [redacted]"'


def _token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def test_cli_token_flag_warns_and_an_empty_token_file_is_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    empty = _token_file(tmp_path, "# nothing\n\n")
    settings = load_settings(None, model="no-such-org/never-loaded")
    assert asyncio.run(run_model_server(settings, "tcp://127.0.0.1:0", token_file=str(empty))) == 2
    assert "holds no token" in capsys.readouterr().err
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert cli_main(["serve-model", "--token", "argv-token", "--model", "no-such-org/never-loaded",
                     "--listen", f"unix://{shared}/m.sock"]) == 2  # refused before anything loads
    err = capsys.readouterr().err
    assert "--token is visible to every user" in err and "written by other users" in err
