"""Configuration, validated up front: a YAML file plus `VOICE_AGENT_*` environment variables.

Precedence: command-line flags > environment > YAML file > defaults. Nested keys use
`__` in the environment, e.g. `VOICE_AGENT_TURNS__MIN_SILENCE_S=0.4`. Every section
forbids unknown keys and an unknown `VOICE_AGENT_*` variable is an error: a typo must not
leave a setting at its default unnoticed. Numbers are numbers: `true` is not 1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.errors import Float, Int, describe_validation_error, did_you_mean, read_yaml
from agent.speech.backchannel import BargeInConfig, available_detectors
from agent.speech.base import TTSSettings
from agent.turns import TurnConfig

ENV_PREFIX = "VOICE_AGENT_"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # OWNER/NAME, what the Hugging Face hub serves
# Our variables that are not settings (read elsewhere, e.g. where tiny-random is cached).
OTHER_ENV = {"VOICE_AGENT_CACHE", "VOICE_AGENT_FRONTEND"}  # FRONTEND: set by serve --processes


class ConfigError(Exception):
    pass




class TurnSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: Float = Field(default=0.5, gt=0, lt=1)
    neg_threshold: Float = Field(default=0.35, gt=0, lt=1)
    pre_roll_s: Float = Field(default=0.25, ge=0, le=2)
    min_speech_s: Float = Field(default=0.15, ge=0, le=5)
    min_silence_s: Float = Field(default=0.5, ge=0.1, le=5)
    max_turn_s: Float = Field(default=30.0, gt=1, le=30)
    # Speech while the agent speaks interrupts it only once it lasted this long: a shorter
    # backchannel ("mm-hm") neither stops the voice nor becomes a turn.
    interrupt_min_speech_s: Float = Field(default=0.3, ge=0, le=5)
    # End of turn: `silence` (the fixed min_silence_s) or an audio model (`smart-turn-prosody`:
    # Smart Turn combined with pitch, lengthening, energy and turn length, calibrated on real
    # speech (agent/eot/policy.py, docs/turn-taking.md); `smart-turn`; any
    # `voice_agent.turn_detectors` entry point): complete → commit after
    # min_silence_s_complete, incomplete → wait up to max_silence_s, unsure → min_silence_s.
    end_of_turn: str = "smart-turn-prosody"
    min_silence_s_complete: Float = Field(default=0.2, ge=0.05, le=5)
    max_silence_s: Float = Field(default=2.0, ge=0.1, le=10)
    # The default policy's, from `voice-agent bench turns --calibrate` (Smart Turn alone, as pipecat
    # runs it: 0.5 and 0.5).
    complete_threshold: Float = Field(default=0.6, gt=0, lt=1)  # P(complete) ≥ this: complete
    incomplete_threshold: Float = Field(default=0.2, gt=0, lt=1)  # < this: incomplete; between: fixed rule
    # Preemptive answers: the answer (text and speech) starts after preempt_after_s of
    # silence, kept back until the turn commits, dropped if speech resumes (agent/reply.py).
    preemptive: bool = True
    preempt_after_s: Float = Field(default=0.16, ge=0.03, le=2)

    # Speech over the agent's voice (agent/speech/bargein.py): the voice pauses at once and the
    # detector decides — a backchannel resumes it (no turn), an interruption cancels it.
    backchannel: str = "commands"  # duration (interrupt_min_speech_s) | features | commands | an entry point
    pause_on_speech: bool = True  # False: the answer plays on until the detector says interruption
    backchannel_max_s: Float = Field(default=0.9, gt=0, le=5)  # features: longer speech interrupts
    backchannel_max_syllables: Int = Field(default=3, ge=1, le=20)  # features: more is content
    backchannel_louder_db: Float = Field(default=6.0, ge=0, le=40)  # features: louder than the user's own speech
    resume_after_s: Float = Field(default=0.5, ge=0, le=2)  # silence after a backchannel before resuming
    echo_playout_s: Float = Field(default=0.3, ge=0, le=2)  # echo gate kept after the last audible frame
    # commands (agent/speech/commands.py): these phrases said alone over the answer cancel it; the
    # spotter tells them from `backchannel_words`. `command_turn`: the command also becomes a turn.
    commands: list[str] = Field(default_factory=lambda: ["stop", "wait", "hold on", "no", "cancel", "pause",
                                                         "be quiet"])
    backchannel_words: list[str] = Field(default_factory=lambda: ["yeah", "uh huh", "mm hm", "right", "okay",
                                                                  "sure", "i see"])
    command_turn: bool = False

    @field_validator("end_of_turn")
    @classmethod
    def _known_detector(cls, value: str) -> str:
        from agent.eot import SILENCE, detector_factory

        if value != SILENCE:
            detector_factory(value)  # ValueError names the installed ones
        return value

    @field_validator("backchannel")
    @classmethod
    def _known_interruption_detector(cls, value: str) -> str:
        if value not in available_detectors():
            raise ValueError(f"unknown interruption detector {value!r}; available: {', '.join(available_detectors())}")
        return value

    def to_turn_config(self) -> TurnConfig:
        return TurnConfig(**self.model_dump(exclude={"interrupt_min_speech_s", "end_of_turn", "preemptive",
                                                     "preempt_after_s", *_BARGEIN_KEYS}))

    def to_bargein_config(self) -> BargeInConfig:
        return BargeInConfig(pause=self.pause_on_speech, threshold=self.threshold, neg_threshold=self.neg_threshold,
                             commands=tuple(self.commands), backchannel_words=tuple(self.backchannel_words),
                             **self.model_dump(include={"interrupt_min_speech_s", *_BARGEIN_KEYS}
                                               - {"pause_on_speech", "commands", "backchannel_words"}))


_BARGEIN_KEYS = {"backchannel", "pause_on_speech", "backchannel_max_s", "backchannel_max_syllables",
                 "backchannel_louder_db", "resume_after_s", "echo_playout_s", "commands", "backchannel_words",
                 "command_turn"}


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: Int = Field(default=8080, ge=0, le=65535)
    token: str | None = None  # bearer token for every endpoint but /healthz
    cors_origins: list[str] = Field(default_factory=list)
    # 0: as many as the backend queues requests (max_queue, 64): a session has at most one
    # committed request in flight, so more sessions than that would be told `busy` together.
    max_sessions: Int = Field(default=0, ge=0)
    max_body_bytes: Int = Field(default=64 * 1024, ge=1024)
    idle_timeout_s: Float = Field(default=3600.0, gt=0)  # session with no activity at all
    no_audio_timeout_s: Float = Field(default=30.0, gt=0)  # connected but no audio frames
    # Incoming audio waits for this many later frames before it goes on (aiortc's audio jitter
    # buffer holds 4: ~80 ms more before the VAD hears the end of speech). The VAD is no playout:
    # a late packet is better dropped than waited for (agent/transports/webrtc.py).
    receive_jitter_frames: Int = Field(default=1, ge=0, le=16)
    ice_servers: list[str] = Field(default_factory=list)  # none by default: nothing leaves the host
    http: bool = True  # False: `serve` runs only the Wyoming server
    processes: Int | None = Field(default=None, ge=1)  # serve: frontend processes; None: the cores, at most 8


class ModelServerSettings(BaseModel):
    """`voice-agent serve-model`: the inference pool behind the OpenAI chat-completions wire."""

    model_config = ConfigDict(extra="forbid")

    listen: str = Field(default="tcp://127.0.0.1:8000", pattern=r"^(tcp|unix)://.+")
    token: str | None = None  # bearer token; required when listening beyond loopback
    tokens: list[str] = Field(default_factory=list)  # more clients, each with keys of its own
    token_file: str | None = None  # tokens, one per line (no token on a command line: `ps` shows it)
    max_conversations: Int = Field(default=1024, ge=1)  # conversation keys (their KV) kept, LRU
    conversation_ttl_s: Float = Field(default=600.0, gt=0)  # a key idle this long is forgotten
    max_body_bytes: Int = Field(default=64 * 1024**2, ge=1024)  # a whole conversation, audio as base64 WAV


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    model: str = "auto"  # auto | tiny-random | random-7b | HUB_ID | PATH
    backend: Literal["transformers", "openai", "scripted"] = "transformers"
    script: str | None = None  # backend scripted: the YAML file of answers (agent.inference.scripted)
    openai_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str | None = None  # None: the one model the server serves (its /v1/models)
    openai_api_key: str | None = None
    openai_max_audios: Int = Field(default=5, ge=1)  # clips per request: the server's --limit-mm-per-prompt
    workers: Int | None = Field(default=None, ge=1)
    # A worker with requests in flight and no step done for this long is wedged: restarted.
    step_timeout_s: Float = Field(default=60.0, gt=0)
    max_batch: Int = Field(default=16, ge=1, le=256)
    max_queue: Int = Field(default=64, ge=1)
    # Inference memory (local backend): the share of each GPU a worker may use, as a fraction
    # (≤ 1) or in bytes (> 1), vLLM's meaning; the KV budget is what the model leaves of it.
    gpu_memory_utilization: Float = Field(default=0.9, gt=0)
    kv_budget_tokens: Int | None = Field(default=None, ge=1)  # caps it (CPU: the budget, default 1 GiB worth)
    prefill_chunk_tokens: Int = Field(default=512, ge=16)  # prefill per engine step: streams never wait longer
    encoder_padded: bool = False  # run the audio encoder on the 30 s pad, as transformers does (slower)
    system_prompt: str | None = None
    max_new_tokens: Int = Field(default=256, ge=1, le=4096)
    context_tokens: Int = Field(default=6000, ge=512)
    max_tool_rounds: Int = Field(default=3, ge=0, le=10)
    tool_timeout_s: Float = Field(default=10.0, gt=0)
    agent_id: str = "agent"
    turns: TurnSettings = Field(default_factory=TurnSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tts: TTSSettings = Field(default_factory=TTSSettings)  # speech out; engine `none` = text only
    wyoming: str | None = Field(default=None, pattern=r"^(tcp|unix)://",  # Wyoming server
                               examples=["tcp://0.0.0.0:10300", "unix:///run/voice-agent.sock"])
    record: str | None = None  # a directory: record every turn's audio, history, answer and feedback (people's voices)
    model_server: ModelServerSettings = Field(default_factory=ModelServerSettings)

    _yaml: dict[str, Any] = {}

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str) -> str:
        """A value that looks like a path must be a directory; otherwise the hub client
        answers with a puzzling message about repo id characters."""
        path = Path(value).expanduser()
        looks_like_path = (value.startswith(("/", ".", "~")) or value.endswith("/") or "\\" in value
                           or value.count("/") > 1)
        if looks_like_path and not path.is_dir():
            raise ValueError(f"{value}: {'not a directory' if path.exists() else 'no such directory'}")
        from agent.inference.models import NAMES, REAL_MODEL

        if not looks_like_path and value not in NAMES and not path.is_dir() and not HUB_ID.fullmatch(value):
            # Neither ours, a directory nor OWNER/NAME: say so now, not after the hub's retries.
            raise ValueError(f"{value!r} is not a model: expected {', '.join(NAMES)}, a directory, or a "
                             f"Hugging Face hub id such as {REAL_MODEL}{did_you_mean(value, list(NAMES))}")
        return str(path) if value.startswith("~") else value

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if not self.server.max_sessions:
            self.server.max_sessions = self.max_queue
        return self

    @model_validator(mode="after")
    def _script_for_scripted(self) -> Settings:
        if self.backend == "scripted":
            if self.script is None:
                raise ValueError("backend scripted needs a script file (--script FILE.yaml, or script: in the config)")
            from agent.inference.scripted import load_script

            load_script(self.script)  # a bad script fails here, before anything starts
        return self

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


def _env_names() -> list[str]:
    """Every variable name that sets something (sections: each key, and the whole section as JSON)."""
    names = []
    for name, field in Settings.model_fields.items():
        names.append(ENV_PREFIX + name.upper())
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names += [f"{ENV_PREFIX}{name.upper()}__{key.upper()}" for key in section.model_fields]
    return names


def check_environment(environ: dict[str, str] | os._Environ[str] | None = None) -> None:
    """Raise ConfigError naming every `VOICE_AGENT_*` variable that sets nothing."""
    environ = os.environ if environ is None else environ
    known = set(_env_names())
    unknown = []
    for key in environ:
        name = key.upper()  # pydantic-settings matches names case-insensitively
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_ENV:
            continue
        if name.startswith(f"{ENV_PREFIX}PLUGINS__"):
            continue  # plugin sections validate their own keys when the plugins load
        unknown.append(f"{key}{did_you_mean(name, sorted(known))}")
    if unknown:
        raise ConfigError(f"unknown environment variable{'s' if len(unknown) > 1 else ''}: {', '.join(sorted(unknown))}")


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = read_yaml(path) or {}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def read_yaml_section(path: str | Path | None, key: str) -> dict[str, Any]:
    """One mapping section of the config file ({} when absent or unreadable: load_settings reports that)."""
    if path is None:
        return {}
    try:
        data = read_yaml(path) or {}
    except ValueError:
        return {}
    section = data.get(key) if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration; raises ConfigError with every problem listed."""
    data = _read_yaml(path) if path is not None else {}
    check_environment()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    Settings._yaml = data
    try:
        settings = Settings(**overrides)
        settings.turns.to_turn_config()
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc, '', model=Settings)}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        Settings._yaml = {}
    return settings
