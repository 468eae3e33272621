"""Home Assistant MQTT discovery: the agent appears in HA as a device with three entities.

- sensor `last_response`: the text of the last answer;
- binary_sensor `listening`: on between speech.started and speech.stopped;
- switch `muted`: a flag HA can flip; the plugin keeps it (`muted`) for applications to read.

Configs are retained at `<discovery_prefix>/<component>/<node_id>/<object_id>/config` and sent
again whenever HA announces itself (`<discovery_prefix>/status` = `online`).

With `serve --processes N` every frontend publishes its own sessions' `listening` and
`last_response` (one device, as one process with many sessions would), but only the `owner`
(frontend 0, which also serves Wyoming) announces configs and availability and has the last
will: a frontend that restarts neither flaps the device offline nor resets its states.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field

from agent.events import Event
from plugins.mqtt.connection import MqttConnection, Outgoing

log = logging.getLogger(__name__)


class DiscoveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    discovery_prefix: str = "homeassistant"
    state_prefix: str = "voice_agent"
    node_id: str | None = None  # default: the agent id
    name: str = "Voice agent"
    reconnect_min_s: float = Field(0.1, gt=0)


class Discovery:
    def __init__(self, config: DiscoveryConfig, agent_id: str, owner: bool = True) -> None:
        self.config = config
        self.node_id = config.node_id or agent_id
        self.base = f"{config.state_prefix}/{self.node_id}/ha"
        self.availability = f"{self.base}/availability"
        self.muted = False
        self.listening = False
        self.last_response = ""
        self.birth_topic = f"{config.discovery_prefix}/status"
        self.owner = owner
        self.conn = MqttConnection(
            config.host, config.port, username=config.username, password=config.password,
            will=Outgoing(self.availability, "offline", 1, True) if owner else None,
            subscriptions=(self.birth_topic, f"{self.base}/muted/set"), on_message=self._on_message,
            on_connect=self.announcements if owner else list, backoff_min=config.reconnect_min_s,
            name="homeassistant discovery")

    def config_topic(self, component: str, object_id: str) -> str:
        return f"{self.config.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def _entity(self, object_id: str, name: str, **extra: Any) -> str:
        return json.dumps({
            "name": name, "unique_id": f"{self.node_id}_{object_id}", "object_id": f"{self.node_id}_{object_id}",
            "availability_topic": self.availability,
            "device": {"identifiers": [f"voice_agent_{self.node_id}"], "name": self.config.name,
                       "manufacturer": "qwen-voice-agent"},
            **extra})

    def announcements(self) -> list[Outgoing]:
        """Discovery configs, availability and current states (sent on every (re)connect)."""
        return [
            Outgoing(self.config_topic("sensor", "last_response"),
                     self._entity("last_response", "Last response", state_topic=f"{self.base}/last_response",
                                  icon="mdi:message-text"), 1, True),
            Outgoing(self.config_topic("binary_sensor", "listening"),
                     self._entity("listening", "Listening", state_topic=f"{self.base}/listening",
                                  payload_on="ON", payload_off="OFF", device_class="sound"), 1, True),
            Outgoing(self.config_topic("switch", "muted"),
                     self._entity("muted", "Muted", state_topic=f"{self.base}/muted",
                                  command_topic=f"{self.base}/muted/set", payload_on="ON", payload_off="OFF"), 1, True),
            Outgoing(self.availability, "online", 1, True),
            *self._states(),
        ]

    def _states(self) -> list[Outgoing]:
        return [Outgoing(f"{self.base}/last_response", self.last_response, 1, True),
                Outgoing(f"{self.base}/listening", "ON" if self.listening else "OFF", 1, True),
                Outgoing(f"{self.base}/muted", "ON" if self.muted else "OFF", 1, True)]

    def start(self) -> None:
        self.conn.start()

    async def stop(self) -> None:
        await self.conn.stop(last=[Outgoing(self.availability, "offline", 1, True)] if self.owner else [])

    def on_event(self, event: Event) -> None:
        if event.type == "speech.started":
            self.listening = True
            self.conn.publish(f"{self.base}/listening", "ON", retain=True)
        elif event.type == "speech.stopped":
            self.listening = False
            self.conn.publish(f"{self.base}/listening", "OFF", retain=True)
        elif event.type == "response.done":
            self.last_response = event.text[:255]  # HA refuses sensor states longer than 255
            self.conn.publish(f"{self.base}/last_response", self.last_response, retain=True)

    async def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload.decode(errors="replace") if isinstance(message.payload, bytes) else str(message.payload)
        if message.topic.matches(self.birth_topic):
            if payload == "online" and self.owner:  # HA restarted: it forgot non-retained state, announce again
                for msg in self.announcements():
                    self.conn.publish(msg.topic, msg.payload, msg.qos, msg.retain)
        elif payload in ("ON", "OFF"):
            self.muted = payload == "ON"  # every frontend keeps the flag; the owner confirms it
            if self.owner:
                self.conn.publish(f"{self.base}/muted", payload, retain=True)
        else:
            log.warning("homeassistant discovery: ignoring %r on %s", payload[:50], message.topic)
