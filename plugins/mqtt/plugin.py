"""MQTT plugin: every event to the broker, commands from it, and an `mqtt_publish` tool.

Topics (`<base>` = `<prefix>/<agent_id>`):
- `<base>/sessions/<session_id>/events` — each event's JSON, QoS 1 (events that belong to
  no session, e.g. an agent-wide error, go to `<base>/events`);
- `<base>/status` — `online`, retained; the broker publishes the last will `offline`;
- `<base>/sessions/<session_id>/commands` and `<base>/commands` (every session) — commands.

With `serve --processes N` every frontend has its own connection (client id with its index):
it publishes its own sessions' events and acts on commands for the sessions it holds (a
session's id names its frontend); `<base>/commands` reaches every frontend's sessions. Status:
frontend 0 keeps `<base>/status`, frontend i > 0 `<base>/frontends/<i>/status`, each with its
own last will, so a frontend that dies shows as offline until it is back.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiomqtt
from pydantic import Field, field_validator

from agent.events import Event, read_command
from agent.plugin import Plugin, PluginConfig, PluginContext
from agent.tools import Tool
from plugins.mqtt.connection import MqttConnection, Outgoing

log = logging.getLogger(__name__)


def _check_level(value: str, what: str) -> str:
    if not value or any(c in value for c in "+#") or value.startswith("/") or value.endswith("/"):
        raise ValueError(f"{what} must be a topic path without wildcards or outer slashes, got {value!r}")
    return value


class MqttConfig(PluginConfig):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    prefix: str = "voice_agent"
    agent_id: str | None = None  # default: the agent's id
    allowed_publish_topics: list[str] = Field(default_factory=list)
    outbox_size: int = Field(10_000, ge=1)
    inflight_window: int = Field(64, ge=1, le=65535)  # QoS 1 messages sent before their PUBACK
    reconnect_min_s: float = Field(0.1, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)
    keepalive: int = Field(30, ge=5)
    connect_timeout_s: float = Field(5.0, ge=0)  # how long start() waits for the first connection

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _check_level(v, "prefix")

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str | None) -> str | None:
        return None if v is None else _check_level(v, "agent_id")

    @field_validator("allowed_publish_topics")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            aiomqtt.Wildcard(pattern)  # raises ValueError for a malformed filter
        return v


def topic_allowed(topic: str, patterns: list[str]) -> bool:
    try:
        t = aiomqtt.Topic(topic)  # rejects wildcards and empty topics
    except ValueError:
        return False
    return any(t.matches(p) for p in patterns)


class MqttPlugin(Plugin):
    name = "mqtt"
    Config = MqttConfig

    def __init__(self, config: MqttConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.config: MqttConfig = config
        self.agent_id = _check_level(config.agent_id or context.agent_id, "agent_id")
        self.base = f"{config.prefix}/{self.agent_id}"
        frontend = context.frontend
        self.status_topic = f"{self.base}/frontends/{frontend}/status" if frontend else f"{self.base}/status"
        process = "" if frontend is None else f"f{frontend}-"  # ids in other processes may be equal
        self.conn = MqttConnection(
            config.host, config.port, username=config.username, password=config.password,
            client_id=f"voice-agent-{self.agent_id}-{process}{id(self):x}",
            will=Outgoing(self.status_topic, "offline", 1, True),
            subscriptions=(f"{self.base}/sessions/+/commands", f"{self.base}/commands"),
            on_message=self._on_message, on_connect=self._birth, outbox_size=config.outbox_size,
            backoff_min=config.reconnect_min_s, backoff_max=config.reconnect_max_s,
            keepalive=config.keepalive, window=config.inflight_window, name=f"mqtt {config.host}:{config.port}")

    def _birth(self) -> list[Outgoing]:
        return [Outgoing(self.status_topic, "online", 1, True)]

    async def start(self) -> None:
        self.conn.start()
        # The agent works without the broker; it connects (and catches up) when it can.
        if not await self.conn.wait_connected(self.config.connect_timeout_s):
            log.warning("mqtt: broker %s:%d not reachable yet (%s); events are queued and sent on connect",
                        self.config.host, self.config.port, self.conn.last_error or "no answer")

    async def stop(self) -> None:
        await self.conn.stop(last=[Outgoing(self.status_topic, "offline", 1, True)])

    def event_topic(self, session_id: str) -> str:
        return f"{self.base}/sessions/{session_id}/events" if session_id else f"{self.base}/events"

    async def on_event(self, event: Event) -> None:
        self.conn.publish(self.event_topic(event.session_id), event.model_dump_json(), qos=1)

    async def _on_message(self, message: aiomqtt.Message) -> None:
        levels = message.topic.value.split("/")
        session_id = levels[-2] if message.topic.matches(f"{self.base}/sessions/+/commands") else None
        if session_id is not None and not self.context.owns(session_id):
            return  # another frontend holds this session (serve --processes)
        raw = message.payload
        # paho hands small numbers over as int/float
        payload = raw if isinstance(raw, (str, bytes, bytearray)) else json.dumps(raw)
        command = read_command(payload)
        if isinstance(command, str):
            if not self.context.owns(session_id):
                return  # a bad command to every session: frontend 0 says so, once
            self.context.commands.report_error(session_id, "bad_command", f"{command} (on MQTT)")
            return
        try:
            await self.context.commands.send_command(session_id, command)
        except KeyError:
            self.context.commands.report_error(session_id, "bad_command", f"unknown session {session_id!r}")
        except Exception as exc:
            log.exception("mqtt: command %s failed", command.type)
            self.context.commands.report_error(session_id, "command_failed", f"{command.type}: {exc}")

    def tools(self) -> list[Tool]:
        patterns = list(self.config.allowed_publish_topics)
        if not patterns:
            return []  # nothing may be published: offer no tool at all
        conn = self.conn

        async def mqtt_publish(topic: str, payload: Any, retain: bool = False) -> str:
            if not topic_allowed(topic, patterns):
                raise PermissionError(f"topic {topic!r} is not allowed; allowed: {', '.join(patterns)}")
            body = payload if isinstance(payload, str) else json.dumps(payload)
            conn.publish(topic, body, qos=1, retain=retain)
            return f"published to {topic}" if conn.connected.is_set() else f"queued for {topic} (broker offline)"

        return [Tool(mqtt_publish, description=(
            "Publish a message to an MQTT topic. Allowed topic patterns: " + ", ".join(patterns)
            + ". payload: a string, or a JSON value that is sent as JSON."))]
