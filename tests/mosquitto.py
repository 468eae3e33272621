"""MQTT test helpers: a private mosquitto broker on a free loopback port, an observer client,
a fake CommandTarget.

`Broker(tmp_path).start()` writes a config (`listener <port> 127.0.0.1`,
`allow_anonymous true`, `persistence false`), or with `users={"name": "pw"}` a password file
made by `mosquitto_passwd -b -c` and `allow_anonymous false`. `restart()` keeps the port,
so clients can reconnect to the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt

from agent.bus import EventBus
from agent.events import Command, Error

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, workdir: Path, users: dict[str, str] | None = None, persistence: bool = False) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.users = users or {}
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"

    def _write_config(self) -> Path:
        # As root, mosquitto would switch to user "mosquitto", who cannot read our temp dir.
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}", f"listener {self.port} 127.0.0.1",
                 f"log_dest file {self.log}", "log_type error", "log_type warning"]
        if self.persistence:
            # Keeps persistent client sessions (and their queued QoS 1 messages) across restart().
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 0"]
        else:
            lines.append("persistence false")
        if self.users:
            pwfile = self.dir / "passwd"
            first = True
            for user, password in self.users.items():
                args = [MOSQUITTO_PASSWD, "-b"] + (["-c"] if first else []) + [str(pwfile), user, password]
                subprocess.run(args, check=True, capture_output=True)
                first = False
            pwfile.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Broker:
        conf = self._write_config()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it accepts connections
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err} "
                                   f"{self.log.read_text() if self.log.exists() else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: it saves its persistence file first
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class FakeCommands:
    """A CommandTarget that records; `report_error` publishes an error event like the runtime does."""

    def __init__(self, bus: EventBus, sessions: tuple[str, ...] = ("s1", "s2")) -> None:
        self.bus = bus
        self.sessions = sessions
        self.commands: list[tuple[str | None, Command]] = []
        self.errors: list[tuple[str | None, str, str]] = []

    async def send_command(self, session_id: str | None, command: Command) -> None:
        if session_id is not None and session_id not in self.sessions:
            raise KeyError(session_id)
        self.commands.append((session_id, command))

    def report_error(self, session_id: str | None, code: str, message: str) -> None:
        self.errors.append((session_id, code, message))
        self.bus.publish(Error(session_id=session_id or "", code=code, message=message))


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> None:
    """Wait for a condition; the timeout only guards against hanging forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Observer:
    """A second MQTT client that records every message on `topic`, reconnecting as needed.

    With `persistent=True` its session (and the QoS 1 messages queued for it) survives its
    own disconnects, so nothing sent while it was away is missed.
    """

    def __init__(self, port: int, topic: str = "#", persistent: bool = False, **auth: Any) -> None:
        self.port, self.topic, self.persistent, self.auth = port, topic, persistent, auth
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on(self, topic_filter: str) -> list[str]:
        return [p.decode() for t, p, _ in self.messages if aiomqtt.Topic(t).matches(topic_filter)]

    def json_on(self, topic_filter: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on(topic_filter)]

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"observer-{id(self):x}",
                                          clean_session=not self.persistent, **self.auth) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        self.messages.append((m.topic.value, payload, m.retain))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Observer]:
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self.subscribed.wait(), 10)
            yield self
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def send(port: int, topic: str, payload: str | bytes, **auth: Any) -> None:
    async with aiomqtt.Client("127.0.0.1", port, **auth) as client:
        await client.publish(topic, payload, qos=1)
