"""The `livekit:` plugin config and the access token the agent joins with."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from livekit import api
from pydantic import Field, SecretStr, field_validator, model_validator

from agent.plugin import PluginConfig

EVENTS_TOPIC = "voice-agent.events"
COMMANDS_TOPIC = "voice-agent.commands"


class LiveKitConfig(PluginConfig):
    url: str  # ws://host:7880 or wss://project.livekit.cloud
    api_key: str = Field(min_length=1)
    api_secret: SecretStr  # SecretStr: never shows up in logs or config dumps
    room: str = Field(min_length=1)
    identity: str | None = Field(None, min_length=1)  # default: the agent's id
    events_topic: str = Field(EVENTS_TOPIC, min_length=1)
    commands_topic: str = Field(COMMANDS_TOPIC, min_length=1)
    connect_timeout_s: float = Field(10.0, gt=0)  # start() gives up after this long
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)  # backoff cap after a full disconnect
    max_queue_s: float = Field(2.0, gt=0)  # audio buffered per track before the oldest drops
    token_ttl_s: float = Field(6 * 3600, gt=60)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"must be a ws:// or wss:// URL (the LiveKit server), got {v!r}")
        if not parts.hostname:
            raise ValueError(f"has no host: {v!r}")
        return v.strip()

    @field_validator("api_secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> LiveKitConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s ({self.reconnect_min_s})")
        return self


def make_token(config: LiveKitConfig, identity: str, *, publish: bool = False) -> str:
    """A JWT that lets the agent join `config.room`, subscribe to audio and send data;
    `publish`: also publish its voice (a microphone-source audio track), when TTS is on."""
    grants = api.VideoGrants(room_join=True, room=config.room, can_subscribe=True, can_publish=publish,
                             can_publish_sources=["microphone"] if publish else None,
                             can_publish_data=True, agent=True)
    return (api.AccessToken(config.api_key, config.api_secret.get_secret_value())
            .with_identity(identity)
            .with_name(identity)
            .with_kind("agent")
            .with_ttl(timedelta(seconds=config.token_ttl_s))
            .with_grants(grants)
            .to_jwt())
