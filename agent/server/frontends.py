"""`voice-agent serve --processes N`: a supervisor, one model server and N media frontends.

    supervisor ─┬─ model server   `voice-agent serve-model` on <run_dir>/model.sock (the one
                │                  inference pool: workers, batching, KV reuse), only when the
                │                  backend is the local pool (`transformers`)
                └─ frontend 0..N-1 `serve` itself, re-run with FRONTEND_ENV set: its own event
                                   loop, aiortc, VAD service, turns, TTS, plugins and sessions,
                                   all on the one listening socket the supervisor bound and
                                   passed down (inherited fd), and a private socket;
                                   backend `openai` at unix://<run_dir>/model.sock

Frontends are the same program started again (`sys.orig_argv`), so an agent script with its own
tools and hooks runs as N frontends unchanged. With `--backend scripted` or `openai` no model
server starts: each frontend uses that backend itself. Routing between frontends, the split of
`max_sessions` and the aggregated `/healthz` and `/metrics` are in `agent.server.router`.

Failures: a frontend that exits is started again (backoff 0.5 s doubling to 10 s, reset after
30 s of running); only its sessions are lost. The model server likewise: meanwhile every turn
ends in `backend_unavailable` and the frontends keep running. `--processes 1` is plain `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.config import Settings
from agent.server import secrets
from agent.server.router import FORWARDED, FRONTEND_ENV, FrontendInfo, Router

log = logging.getLogger(__name__)

MAX_DEFAULT_PROCESSES = 8
BACKOFF_MIN_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 0.5, 10.0, 30.0
START_TIMEOUT_S = 120.0  # a frontend loads VAD and TTS; the model server may take far longer
MODEL_START_TIMEOUT_S = 1800.0


def default_processes() -> int:
    """The cores this process may use, at most 8 (past that the model server is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_PROCESSES))


def serve_processes(settings: Settings, runtime_options: dict[str, Any], config: str | None = None) -> int:
    """`serve`: a frontend when the supervisor started this process, else one process or N."""
    from agent.server.app import serve

    info = FrontendInfo.from_env()
    if info is not None:
        os.environ.pop(FRONTEND_ENV)  # not inherited by this frontend's own children (TTS, workers)
        return asyncio.run(run_frontend(settings, info, runtime_options))
    n = settings.server.processes or default_processes()
    if n <= 1 or not settings.server.http:
        return asyncio.run(serve(settings, runtime_options=runtime_options))
    return asyncio.run(Supervisor(settings, n, config).run())


async def run_frontend(settings: Settings, info: FrontendInfo, runtime_options: dict[str, Any]) -> int:
    from agent.server.app import serve

    settings.server.port = info.port
    settings.server.max_sessions = info.share
    if info.index != 0:
        settings.wyoming = None  # one owner: HA's later connections must reach the same process
    if info.openai_url is not None:  # the supervisor's model server
        settings.backend, settings.openai_url, settings.openai_model = "openai", info.openai_url, settings.model
        settings.openai_api_key = _model_server_token(settings) or settings.openai_api_key
    return await serve(settings, runtime_options=runtime_options, frontend=Router(info))


def _model_server_token(settings: Settings) -> str | None:
    """The token the frontends send to the supervisor's model server (the child reads the
    same settings from the environment or file: no token is ever on its command line)."""
    ms = settings.model_server
    if ms.token or ms.tokens or not ms.token_file:
        return ms.token or (ms.tokens[0] if ms.tokens else None)
    return secrets.read_token_file(ms.token_file)[0]


def model_server_command(settings: Settings, sock: str, config: str | None = None) -> list[str] | None:
    """How the supervisor starts the pool (None: the frontends use the configured backend):
    the settings `serve` resolved (flags, environment, file), the rest from the same file."""
    if settings.backend != "transformers":
        return None
    cmd = [sys.executable, "-m", "agent.cli", "serve-model", "--listen", f"unix://{sock}", "--model", settings.model,
           "--max-batch", str(settings.max_batch), "--max-queue", str(settings.max_queue),
           "--max-new-tokens", str(settings.max_new_tokens)]
    cmd += ["--workers", str(settings.workers)] if settings.workers else []
    cmd += ["--config", config] if config else []
    return cmd + (["-v"] if logging.getLogger().isEnabledFor(logging.INFO) else [])


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health: str  # the Unix socket answering /healthz once it is up
    need_ok: bool = False  # ready only at 200 (the model server: loaded); else any answer
    pass_fds: tuple[int, ...] = ()  # the frontends: the listening socket
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.ready.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.health)  # a dead process's socket: readiness means the new one's
        self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                                                         preexec_fn=_die_with_parent, pass_fds=self.pass_fds)
        self.started = time.monotonic()


class Supervisor:
    def __init__(self, settings: Settings, processes: int, config: str | None = None) -> None:
        self.settings = settings
        self.processes = processes
        self.config = config
        self.run_dir = secrets.run_dir()  # 0700, ours: the model server's socket needs no token
        self.children: list[Child] = []
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _run(self) -> int:
        server = self.settings.server
        try:
            listener, port = listen_once(server.host, server.port)
        except OSError as exc:
            print(f"voice-agent: cannot listen on {server.host}:{server.port}: {(exc.strerror or str(exc)).lower()}"
                  " (another port: --port N)", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        model_sock = os.path.join(self.run_dir, "model.sock")
        model_cmd = model_server_command(self.settings, model_sock, self.config)
        if model_cmd is not None:
            self.children.append(Child("model server", model_cmd, dict(os.environ), model_sock, need_ok=True))
        for i in range(self.processes):
            info = FrontendInfo(i, self.processes, self.run_dir, server.max_sessions, port,
                                f"unix://{model_sock}" if model_cmd is not None else None, listener.fileno())
            self.children.append(Child(f"frontend {i}", [sys.executable, *sys.orig_argv[1:]],
                                       {**os.environ, FRONTEND_ENV: info.to_env()}, info.socket(i),
                                       pass_fds=(listener.fileno(),)))
        watchers = []
        try:
            if model_cmd is not None:  # first: the frontends' backends then see the model it serves
                watchers.append(asyncio.create_task(self._watch(self.children[0])))
                await self._wait_ready(self.children[:1])
            watchers += [asyncio.create_task(self._watch(child)) for child in self.children[len(watchers):]]
            ok = not self.stopping.is_set() and await self._wait_ready(self.children)
            if not ok:
                return 2
            model = self.settings.model if model_cmd is not None else self.settings.backend
            print(f"voice-agent: serving on http://{server.host}:{port}/ ({self.processes} frontends, "
                  f"model {model})", file=sys.stderr, flush=True)
            await self.stopping.wait()
            return 0
        finally:
            self.stopping.set()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self._stop_all()
            listener.close()  # kept until now: a restarted frontend inherits it again
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _wait_ready(self, children: list[Child]) -> bool:
        """True once these children answer; False (said why) when one exits first or never answers."""
        async def all_ready() -> None:
            for child in children:
                await child.ready.wait()

        ready = asyncio.create_task(all_ready())
        stop = asyncio.create_task(self.stopping.wait())
        timeout = MODEL_START_TIMEOUT_S if any(c.need_ok for c in children) else START_TIMEOUT_S
        await asyncio.wait([ready, stop], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stop.cancel()
        failed = [c for c in children if not c.ready.is_set()]
        if failed:
            print(f"voice-agent: {', '.join(c.name for c in failed)} did not start", file=sys.stderr)
        return not failed

    async def _watch(self, child: Child) -> None:
        """Start the child, mark it ready when it answers, start it again when it exits."""
        while not self.stopping.is_set():
            await child.start()
            assert child.proc is not None
            probe = asyncio.create_task(self._probe(child))
            code = await child.proc.wait()
            probe.cancel()
            if self.stopping.is_set():
                return
            if not child.ready.is_set() and child.restarts == 0:
                print(f"voice-agent: {child.name} exited with status {code} while starting", file=sys.stderr)
                self.stopping.set()  # a bad configuration: every restart would fail the same way
                return
            ran = time.monotonic() - child.started
            child.failures = 0 if ran > HEALTHY_AFTER_S else child.failures + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** max(0, child.failures - 1))
            child.restarts += 1
            log.warning("%s exited with status %s after %.1f s; starting it again in %.1f s", child.name, code,
                        ran, delay)
            print(f"voice-agent: {child.name} exited (status {code}); restarting in {delay:.1f} s",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _probe(self, child: Child) -> None:
        connector = aiohttp.UnixConnector(path=child.health)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                try:
                    async with http.get("http://local/healthz", headers={FORWARDED: "supervisor"}) as r:
                        if r.status == 200 or not child.need_ok:
                            child.ready.set()
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)

    async def _stop_all(self) -> None:
        """Frontends first (their sessions end cleanly), then the model server."""
        frontends = [c for c in self.children if c.name.startswith("frontend")]
        for group in (frontends, [c for c in self.children if c not in frontends]):
            procs = [c.proc for c in group if c.proc is not None and c.proc.returncode is None]
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no
    frontend or model server is left behind holding the port or the GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def listen_once(host: str, port: int) -> tuple[socket.socket, int]:
    """The server's one listening socket, bound before anything loads: every frontend accepts on
    it (inherited), so nothing else can share the port — no SO_REUSEPORT, which would let a second
    `serve` of the same user bind it too and take half the connections. OSError when taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's own: TIME_WAIT is no owner
        sock.bind(address)
        sock.listen(1024)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock, sock.getsockname()[1]
