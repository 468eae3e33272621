"""Configuration, validated up front: a YAML file plus `VOICE_AGENT_*` environment variables.

Precedence: command-line flags > environment > YAML file > defaults. Nested keys use
`__` in the environment, e.g. `VOICE_AGENT_TURNS__MIN_SILENCE_S=0.4`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.speech.base import TTSSettings
from agent.turns import TurnConfig


class ConfigError(Exception):
    pass


class TurnSettings(BaseModel):
    threshold: float = Field(0.5, gt=0, lt=1)
    neg_threshold: float = Field(0.35, gt=0, lt=1)
    pre_roll_s: float = Field(0.25, ge=0, le=2)
    min_speech_s: float = Field(0.15, ge=0, le=5)
    min_silence_s: float = Field(0.5, ge=0.1, le=5)
    max_turn_s: float = Field(30.0, gt=1, le=30)
    # Speech while the agent speaks interrupts it only once it lasted this long: a shorter
    # backchannel ("mm-hm") neither stops the voice nor becomes a turn.
    interrupt_min_speech_s: float = Field(0.3, ge=0, le=5)

    def to_turn_config(self) -> TurnConfig:
        return TurnConfig(**self.model_dump(exclude={"interrupt_min_speech_s"}))


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str | None = None  # bearer token for every endpoint but /healthz
    cors_origins: list[str] = Field(default_factory=list)
    max_sessions: int = Field(32, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    idle_timeout_s: float = Field(3600.0, gt=0)  # session with no activity at all
    no_audio_timeout_s: float = Field(30.0, gt=0)  # connected but no audio frames
    ice_servers: list[str] = Field(default_factory=list)  # none by default: nothing leaves the host
    http: bool = True  # False: `serve` runs only the Wyoming server


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOICE_AGENT_", env_nested_delimiter="__", extra="forbid")

    model: str = "auto"  # auto | tiny-random | random-7b | HUB_ID | PATH
    backend: Literal["transformers", "openai"] = "transformers"
    openai_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "Qwen/Qwen2-Audio-7B-Instruct"
    openai_api_key: str | None = None
    workers: int | None = Field(None, ge=1)
    max_batch: int = Field(16, ge=1, le=256)
    max_queue: int = Field(64, ge=1)
    system_prompt: str | None = None
    max_new_tokens: int = Field(256, ge=1, le=4096)
    context_tokens: int = Field(6000, ge=512)
    max_tool_rounds: int = Field(3, ge=0, le=10)
    tool_timeout_s: float = Field(10.0, gt=0)
    agent_id: str = "agent"
    turns: TurnSettings = Field(default_factory=TurnSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tts: TTSSettings = Field(default_factory=TTSSettings)  # speech out; engine `none` = text only
    wyoming: str | None = Field(None, pattern=r"^(tcp|unix)://")  # Wyoming server, e.g. tcp://0.0.0.0:10300

    _yaml: dict[str, Any] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, cls._yaml))


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_yaml_section(path: str | Path | None, key: str) -> dict[str, Any]:
    """One mapping section of the config file ({} when absent or unreadable: load_settings reports that)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    section = data.get(key) if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration; raises ConfigError with every problem listed."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    Settings._yaml = data
    try:
        settings = Settings(**overrides)
        settings.turns.to_turn_config()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        Settings._yaml = {}
    return settings
