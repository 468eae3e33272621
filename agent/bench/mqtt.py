"""MQTT event publishing: messages/s with one QoS 1 message in flight (the old writer) against a
window of them, side by side, against a private mosquitto this benchmark starts.

Each run queues N event-sized messages (a `response.delta` JSON) on a fresh `MqttConnection`
and times until the broker has acknowledged every one (PUBACK). A broker on loopback answers
in microseconds, which hides what the window is for, so every pair also runs through a TCP
proxy that holds each chunk `--latency-ms` in each direction (order kept): a broker one LAN
or WAN hop away, where the old writer manages one message per round trip.

    voice-agent bench mqtt [--messages 2000] [--latency-ms 3] [--window 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

PAYLOAD = json.dumps({"type": "response.delta", "session_id": "0123456789ab", "seq": 1234,
                      "turn_id": "0123456789ab-t12", "text": " the kitchen light is now on"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def mosquitto() -> Iterator[int]:
    """A private broker on a free loopback port (no persistence, anonymous); yields the port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        raise SystemExit("voice-agent bench mqtt: mosquitto is not installed (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        port = _free_port()
        conf = Path(tmp) / "mosquitto.conf"
        # As root, mosquitto would switch to user "mosquitto"; stay who we are.
        conf.write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlistener {port} 127.0.0.1\n"
                        "allow_anonymous true\npersistence false\nlog_dest none\n")
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"mosquitto exited: {proc.stderr.read().decode() if proc.stderr else ''}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("mosquitto did not start listening within 10 s") from None
                    time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()


class DelayProxy:
    """A loopback TCP proxy that delivers each chunk `delay` seconds after it arrived, in order,
    in both directions: a fixed one-way latency of `delay` added to the path."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            down_w.close()
            return
        for src, dst in ((down_r, up_w), (up_r, down_w)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        held: collections.deque[tuple[float, bytes]] = collections.deque()
        arrived = asyncio.Event()
        eof = False

        async def deliver() -> None:
            while held or not eof:
                if not held:
                    arrived.clear()
                    await arrived.wait()
                    continue
                due, data = held[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                held.popleft()
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await src.read(65536):
                held.append((loop.time() + self.delay, data))
                arrived.set()
            eof = True
            arrived.set()
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            dst.close()


@contextlib.asynccontextmanager
async def path_to(port: int, latency_ms: float) -> AsyncIterator[int]:
    """The port to connect to: the broker itself, or a proxy adding `latency_ms` each way."""
    if latency_ms <= 0:
        yield port
        return
    proxy = await DelayProxy(port, latency_ms / 1000).start()
    try:
        yield proxy.port
    finally:
        await proxy.close()


async def measure(port: int, window: int, messages: int) -> dict[str, Any]:
    """Queue `messages` at once; seconds until the broker acknowledged them all."""
    from plugins.mqtt.connection import MqttConnection

    conn = MqttConnection("127.0.0.1", port, window=window, outbox_size=messages + 1, name="bench")
    conn.start()
    try:
        if not await conn.wait_connected(10):
            raise RuntimeError(f"no connection to the broker on port {port}: {conn.last_error}")
        t0 = time.perf_counter()
        for _ in range(messages):
            conn.publish("bench/voice_agent/events", PAYLOAD, qos=1)
        while conn.published < messages:
            if conn.dropped or conn.failed:
                raise RuntimeError(f"lost messages: dropped {conn.dropped}, failed {conn.failed}")
            await asyncio.sleep(0.001)
        seconds = time.perf_counter() - t0
    finally:
        await conn.stop(flush_timeout=0)
    return {"window": window, "messages": messages, "seconds": round(seconds, 4),
            "msgs_per_s": round(messages / seconds, 1), "peak_inflight": conn.peak_inflight,
            "reconnects": conn.connects - 1}


async def bench(messages: int, latency_ms: float, window: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with mosquitto() as port:
        for latency in sorted({0.0, latency_ms}):
            async with path_to(port, latency) as target:
                # One message per round trip is slow by design: give it fewer, the rate is what counts.
                old_n = messages if latency == 0 else max(50, messages // 10)
                for w, n in ((1, old_n), (window, messages)):
                    runs.append({"latency_ms_each_way": latency, **await measure(target, w, n)})
    speedup = {}
    for latency in sorted({r["latency_ms_each_way"] for r in runs}):
        pair = {r["window"]: r["msgs_per_s"] for r in runs if r["latency_ms_each_way"] == latency}
        speedup[f"{latency:g}ms"] = round(pair[window] / pair[1], 1)
    return {"benchmark": "mqtt", "window": window, "payload_bytes": len(PAYLOAD), "runs": runs,
            "speedup": speedup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench mqtt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run with the window (default 2000)")
    parser.add_argument("--latency-ms", type=float, default=3.0,
                        help="added latency each way for the second pair of runs (default 3; 0: loopback only)")
    parser.add_argument("--window", type=int, default=64, help="messages in flight for the new writer (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.window < 2 or args.latency_ms < 0:
        parser.error("--messages must be ≥ 1, --window ≥ 2, --latency-ms ≥ 0")
    result = asyncio.run(bench(args.messages, args.latency_ms, args.window))
    print(f"MQTT QoS 1 publishing to a local mosquitto, {result['payload_bytes']}-byte events, "
          f"until every PUBACK is in")
    print(f"{'latency each way':>17} {'window':>7} {'messages':>9} {'seconds':>8} {'msgs/s':>9}")
    for r in result["runs"]:
        print(f"{r['latency_ms_each_way']:>14g} ms {r['window']:7d} {r['messages']:9d} {r['seconds']:8.3f} "
              f"{r['msgs_per_s']:9.0f}")
    for latency, ratio in result["speedup"].items():
        print(f"window {args.window} vs 1 at {latency} each way: {ratio}x the messages per second")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
