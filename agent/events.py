"""Events (agent → clients) and commands (clients → agent), defined once.

The same JSON goes over the WebRTC data channel, the WebSocket, MQTT, webhooks and
`voice-agent run --jsonl`. Times are seconds of session audio. Every event carries the
`session_id` and a per-session, strictly increasing `seq`, stamped by `EventStamper`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from agent.errors import describe_validation_error

Mode = Literal["chat", "analysis"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Event(_Message):
    session_id: str = ""
    seq: int = 0


class SessionStarted(_Event):
    type: Literal["session.started"] = "session.started"
    sample_rate: int = 16000
    model: str = ""
    warning: str | None = None


class SessionEnded(_Event):
    type: Literal["session.ended"] = "session.ended"
    reason: str = "closed"


class SpeechStarted(_Event):
    type: Literal["speech.started"] = "speech.started"
    t: float


class SpeechStopped(_Event):
    type: Literal["speech.stopped"] = "speech.stopped"
    t: float


class TurnCommitted(_Event):
    type: Literal["turn.committed"] = "turn.committed"
    turn_id: str
    start: float
    end: float
    mode: Mode
    instruction: str | None = None


class ResponseStarted(_Event):
    type: Literal["response.started"] = "response.started"
    turn_id: str


class ResponseDelta(_Event):
    type: Literal["response.delta"] = "response.delta"
    turn_id: str
    text: str


class ResponseDone(_Event):
    type: Literal["response.done"] = "response.done"
    turn_id: str
    text: str
    tokens: int = 0
    timings: dict[str, float] = Field(default_factory=dict)


class ResponseCancelled(_Event):
    type: Literal["response.cancelled"] = "response.cancelled"
    turn_id: str
    reason: str
    spoken_text: str | None = None  # with speech out: what the user heard before the cut


class ResponseAudioStarted(_Event):
    """The answer's first audio frame went out."""

    type: Literal["response.audio.started"] = "response.audio.started"
    turn_id: str
    # speech_end_to_<stage>: seconds from the end of the user's speech (the VAD's last speech
    # chunk) to end_detected, commit, first_token, first_clause, first_audio, first_frame
    timings: dict[str, float] = Field(default_factory=dict)


class ResponseAudioDone(_Event):
    """The answer's audio played out, or was cut (`interrupted`): `spoken_text` was heard."""

    type: Literal["response.audio.done"] = "response.audio.done"
    turn_id: str
    duration_s: float  # audio played
    spoken_text: str
    interrupted: bool = False
    timings: dict[str, float] = Field(default_factory=dict)  # tts_first_audio_s (after the first delta), tts_rtf


class ToolCall(_Event):
    type: Literal["tool.call"] = "tool.call"
    turn_id: str
    call_id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolResult(_Event):
    type: Literal["tool.result"] = "tool.result"
    call_id: str
    ok: bool
    result: Any = None
    error: str | None = None


class Error(_Event):
    type: Literal["error"] = "error"
    code: str
    message: str
    turn_id: str | None = None


Rating = Literal["up", "down"]


class FeedbackReceived(_Event):
    """A person rated an answer (the `feedback` command): what `--record` stores beside the turn."""

    type: Literal["feedback.received"] = "feedback.received"
    turn_id: str
    rating: Rating
    correction: str | None = None  # what the answer should have been


class ResponsePaused(_Event):
    """Speech began over the answer's voice: the voice holds (`t`, seconds of session audio)
    while it is judged; text and audio keep coming and wait."""

    type: Literal["response.paused"] = "response.paused"
    turn_id: str
    t: float


class ResponseResumed(_Event):
    """The speech was a backchannel: the voice goes on where it paused."""

    type: Literal["response.resumed"] = "response.resumed"
    turn_id: str
    t: float
    paused_s: float  # how long the voice was paused


class SpeechBackchannel(_Event):
    """Speech over the agent's voice judged a backchannel ("yeah", "mm-hm"): no turn, no answer."""

    type: Literal["speech.backchannel"] = "speech.backchannel"
    start: float
    end: float
    turn_id: str | None = None  # the answer it was said over
    detector: str  # turns.backchannel
    features: dict[str, float] = Field(default_factory=dict)  # what the detector measured


Event = Annotated[
    SessionStarted
    | SessionEnded
    | SpeechStarted
    | SpeechStopped
    | TurnCommitted
    | ResponseStarted
    | ResponseDelta
    | ResponseDone
    | ResponseCancelled
    | ResponseAudioStarted
    | ResponseAudioDone
    | ToolCall
    | ToolResult
    | Error
    | FeedbackReceived
    | ResponsePaused
    | ResponseResumed
    | SpeechBackchannel,
    Field(discriminator="type"),
]


class _Command(_Message):
    # Strict: commands come from clients as JSON, where `true` is not the number 1 nor
    # `"5"` a number; pydantic's lax mode would accept both.
    model_config = ConfigDict(extra="forbid", strict=True)


class InstructionSet(_Command):
    """Attach an instruction to the next turn: that turn is audio analysis."""

    type: Literal["instruction.set"] = "instruction.set"
    text: str = Field(max_length=8192)


class ResponseCancel(_Command):
    type: Literal["response.cancel"] = "response.cancel"


class SessionUpdate(_Command):
    type: Literal["session.update"] = "session.update"
    system_prompt: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)
    min_silence_s: float | None = Field(default=None, ge=0.1, le=5.0)


class SessionClose(_Command):
    type: Literal["session.close"] = "session.close"


class Feedback(_Command):
    """Rate an answer of this session: 👍/👎, and optionally what it should have said."""

    type: Literal["feedback"] = "feedback"
    turn_id: str = Field(min_length=1, max_length=128)
    rating: Rating
    correction: str | None = Field(default=None, max_length=8192)


Command = Annotated[
    InstructionSet | ResponseCancel | SessionUpdate | SessionClose | Feedback,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def parse_event(data: str | bytes | dict[str, Any]) -> Event:
    if isinstance(data, dict):
        return EVENT_ADAPTER.validate_python(data)
    return EVENT_ADAPTER.validate_json(data)


def parse_command(data: str | bytes | dict[str, Any]) -> Command:
    """Validate a client command; raises pydantic.ValidationError with the reason."""
    if isinstance(data, dict):
        return COMMAND_ADAPTER.validate_python(data)
    return COMMAND_ADAPTER.validate_json(data)


def read_command(message: str | bytes) -> Command | str:
    """A client command from any transport (WebRTC, WebSocket, LiveKit, MQTT), or the reason
    it is not one: the one place that says what is wrong with a command."""
    if isinstance(message, (bytes, bytearray)):
        try:
            message = bytes(message).decode()
        except UnicodeDecodeError:
            return "a command is UTF-8 JSON text"
    try:
        return parse_command(message)
    except ValidationError as exc:
        return f"invalid command: {describe_validation_error(exc, 'command')}"
    except (ValueError, RecursionError) as exc:  # the JSON parser's own limits (deep nesting, huge numbers)
        return f"invalid command: {type(exc).__name__}"


def json_schema() -> dict[str, Any]:
    """JSON Schema of every event and command (what `voice-agent schema` prints)."""
    return {
        "events": EVENT_ADAPTER.json_schema(),
        "commands": COMMAND_ADAPTER.json_schema(),
    }


class EventStamper:
    """Gives one session's events its id and an increasing sequence number."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._seq = 0

    def stamp(self, event: _Event) -> _Event:
        self._seq += 1
        event.session_id = self.session_id
        event.seq = self._seq
        return event
