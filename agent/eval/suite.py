"""An evaluation suite: audio cases and what should happen, read and checked up front.

    name: smoke
    agent: ../custom_tools.py:agent       # optional: the Agent (tools, prompt, hooks) to evaluate
    config: {tts: {engine: espeak}}       # optional: configuration keys for this suite
    concurrency: 4                        # cases run at once, as live sessions would
    defaults: {max_wer: 0.2, latency: {first_token_s: 2.0}}
    cases:
      - id: kitchen_light
        speak: [0.5, turn on the kitchen light, 1.0]   # espeak-ng speech made at run time (seconds: silence)
        # audio: clips/kitchen.wav                     # or recorded files, relative to the suite
        instruction: null                              # text: every turn is audio analysis
        expect:
          transcript: turn on the kitchen light        # WER of the model's transcription (analysis mode)
          tool_call: {name: set_light, arguments: {room: kitchen}}
          answer: {contains: light}                    # contains | regex | one_of (+ label)
          turns: 1                                     # or [[start, end], …] in seconds (± tolerance_s)
          latency: {first_token_s: 1.0, first_audio_s: 1.5}
        scripted: {turns: […], transcript: …}          # what --backend scripted answers for this case

Every problem is reported at once, each naming the case and the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from agent.errors import describe_validation_error, read_yaml

TRANSCRIBE = "Transcribe the speech into text, without anything else."


class SuiteError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCallExpect(_Strict):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)  # these keys with these values (others allowed)


class AnswerExpect(_Strict):
    contains: str | list[str] | None = None  # every one, case-insensitive
    regex: str | None = None  # re.search, case-insensitive
    one_of: list[str] | None = Field(default=None, min_length=2)  # the answer names exactly one of these labels
    label: str | None = None  # … and it is this one

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _something(self) -> AnswerExpect:
        if self.contains is None and self.regex is None and self.one_of is None:
            raise ValueError("give contains, regex or one_of")
        if self.label is not None and (self.one_of is None or self.label not in self.one_of):
            raise ValueError("label must be one of `one_of`")
        return self


class LatencyExpect(_Strict):
    first_token_s: float | None = Field(default=None, gt=0)  # every turn, from its commit
    first_audio_s: float | None = Field(default=None, gt=0)  # with a TTS engine


class TranscriptExpect(_Strict):
    text: str = Field(min_length=1)
    max_wer: float | None = Field(default=None, ge=0)


class Expect(_Strict):
    transcript: str | TranscriptExpect | None = None
    tool_call: ToolCallExpect | list[ToolCallExpect] | None = None
    answer: AnswerExpect | None = None
    turns: int | list[tuple[float, float]] | None = None
    tolerance_s: float = Field(default=0.3, ge=0)  # for turn boundaries
    latency: LatencyExpect | None = None

    def tool_calls(self) -> list[ToolCallExpect]:
        if self.tool_call is None:
            return []
        return self.tool_call if isinstance(self.tool_call, list) else [self.tool_call]

    def transcript_text(self) -> str | None:
        return self.transcript.text if isinstance(self.transcript, TranscriptExpect) else self.transcript


class Scripted(_Strict):
    """What `--backend scripted` answers in this case: one entry per turn (the scripted backend's
    format, tool calls included) and the transcription (one text per turn, or one for all)."""

    turns: list[Any] = Field(default_factory=list)
    transcript: str | list[str] | None = None


class Case(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    audio: str | list[str] | None = None
    speak: list[str | float] | None = Field(default=None, min_length=1)
    instruction: str | None = None
    expect: Expect = Field(default_factory=Expect)
    scripted: Scripted | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Case:
        if (self.audio is None) == (self.speak is None):
            raise ValueError("give `audio` (file or files) or `speak` (text to synthesise), one of them")
        return self

    def audio_files(self) -> list[str]:
        return [] if self.audio is None else [self.audio] if isinstance(self.audio, str) else self.audio


class Defaults(_Strict):
    max_wer: float = Field(default=0.2, ge=0)
    latency: LatencyExpect | None = None


class Suite(_Strict):
    name: str = "suite"
    agent: str | None = None  # FILE.py:NAME or module:NAME, relative to the suite
    config: dict[str, Any] = Field(default_factory=dict)
    concurrency: int = Field(default=4, ge=1, le=256)
    transcribe_instruction: str = TRANSCRIBE
    gap_s: float = Field(default=1.0, ge=0)  # silence between several audio files of one case
    defaults: Defaults = Field(default_factory=Defaults)
    cases: list[Case] = Field(min_length=1)

    _path: Path = PrivateAttr(default=Path("suite.yaml"))  # set by load_suite

    @property
    def path(self) -> Path:
        return self._path

    def resolve(self, name: str) -> Path:
        """A file named in the suite: relative to the suite's folder."""
        p = Path(name).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    def max_wer(self, case: Case) -> float:
        t = case.expect.transcript
        return t.max_wer if isinstance(t, TranscriptExpect) and t.max_wer is not None else self.defaults.max_wer

    def latency(self, case: Case) -> LatencyExpect | None:
        return case.expect.latency or self.defaults.latency


def _case_name(data: Any, index: int) -> str:
    cases = data.get("cases") if isinstance(data, dict) else None
    if isinstance(cases, list) and index < len(cases) and isinstance(cases[index], dict) and "id" in cases[index]:
        return f"case {cases[index]['id']!r}"
    return f"case #{index + 1}"


def _describe(exc: ValidationError, data: Any) -> list[str]:
    """One line per problem, naming the case (by id) and the key."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
            rest = ".".join(str(p) for p in loc[2:] if not str(p).startswith(("function-", "tagged-")))
            where = f"{_case_name(data, loc[1])}" + (f", key `{rest}`" if rest else "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {msg}")
    return list(dict.fromkeys(lines))


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite; raises SuiteError listing every problem (case and key named)."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ValueError as exc:
        raise SuiteError(f"suite {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"suite {path}: the top level must be a mapping with `cases:`")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        lines = _describe(exc, data)
        if not lines:
            lines = [describe_validation_error(exc, "suite")]
        raise SuiteError(f"suite {path}:\n  " + "\n  ".join(lines)) from None
    suite._path = path.resolve()
    problems = []
    seen: set[str] = set()
    for case in suite.cases:
        if case.id in seen:
            problems.append(f"case {case.id!r}: the id is used twice")
        seen.add(case.id)
        for name in case.audio_files():
            if not suite.resolve(name).is_file():
                problems.append(f"case {case.id!r}, key `audio`: {name}: no such file")
        if case.scripted is not None:
            from agent.inference.scripted import Script

            try:
                if case.scripted.turns:
                    Script(turns=case.scripted.turns).rounds()
            except (ValueError, ValidationError) as exc:
                problems.append(f"case {case.id!r}, key `scripted.turns`: {exc}")
    if problems:
        raise SuiteError(f"suite {path}:\n  " + "\n  ".join(problems))
    return suite
