"""Model families: one module per audio-LLM family knows its format, behind this one interface.

A family is chosen from the checkpoint's `model_type` (config.json): Qwen2-Audio (the default),
Qwen2.5-Omni's thinker and Voxtral. Each family module defines a `FAMILY` with

- its prompt: `render_prompt(messages, add_generation_prompt)`, token-for-token what the
  family's own chat template renders, and the placeholder one audio clip is written as;
- its audio: sample rate, clip limit, `audio_token_count(samples)` (what the placeholder
  expands to), and whether its encoder runs at a clip's real length or a fixed 30 s window;
- its tokens: the specials the tokenizer splits out first, the ones that end an answer;
- its metadata for people choosing a model: checkpoints with sizes, licence, modes, tools.

This module imports no torch and no transformers: the agent process (prompt budgets, the
OpenAI wire) uses it as well as the inference workers.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    hub_id: str
    params_b: float  # billions of parameters of what the agent loads (the thinker, for Omni)
    bf16_gb: float  # weights in bf16, GB
    note: str = ""


@dataclass(frozen=True)
class ToolSyntax:
    """How a family writes tool calls and takes their results back.

    - `open`: what starts the calls in an answer; `close`: what ends each one (Hermes'
      `</tool_call>`), or "" when `open` is followed by one JSON list of calls (Mistral's
      `[TOOL_CALLS][{"name": …, "arguments": …}, …]`);
    - `results_text(results)`: the history entry that returns results, one per call in call
      order, each {"call_id", "name", and "result" or "error"}; `results_role` is the role it is
      sent as ("user" for Hermes' `<tool_response>` blocks, "tool" for Mistral's
      `[TOOL_RESULTS]` blocks, which follow the answer with no user turn between);
    - `tools_block(schemas)`: the tools' declaration, given as (part of) the system text;
    - `new_call_id()`: an id for a call the model wrote none for.
    """

    name: str  # "hermes" | "mistral"
    open: str
    close: str
    results_text: Callable[[list[dict[str, Any]]], str]
    tools_block: Callable[[Sequence[dict[str, Any]]], str]  # the tools' declaration, in the system text
    results_role: str = "user"
    new_call_id: Callable[[], str] | None = None


@dataclass(frozen=True)
class Family:
    name: str  # what people call it: "qwen2-audio"
    title: str
    model_types: tuple[str, ...]  # config.json `model_type` values it loads
    tiny: str  # the offline random model's name for --model
    render_prompt: Callable[[list[dict[str, Any]], bool], str]
    audio_token: str  # the placeholder's token, expanded to `audio_token_count(samples)` ids
    audio_token_count: Callable[[int], int]
    special_tokens: tuple[str, ...]  # split out before BPE (the tokenizer's added tokens in use)
    eos_tokens: tuple[str, ...]
    licence: str
    checkpoints: tuple[Checkpoint, ...]
    modes: tuple[str, ...]  # "chat" (audio only) and/or "analysis" (audio + instruction)
    tools: str  # the tool-call syntax it was trained on ("" when none)
    tool_syntax: ToolSyntax  # how its answers' tool calls are read and results written back
    encoder: str  # "real-length" | "native-real-length" | "padded-30s"
    sample_rate: int = 16000
    max_clip_s: int = 30
    default_system: str | None = None  # inserted by the template when the first turn is not system
    audio_numbered: bool = False  # the template writes "Audio N:" before each clip (Qwen2-Audio)
    notes: str = ""
    special_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = sorted(self.special_tokens, key=len, reverse=True)  # longest first: no prefix wins
        object.__setattr__(self, "special_re", re.compile("|".join(re.escape(t) for t in tokens)))

    @property
    def max_clip_samples(self) -> int:
        return self.max_clip_s * self.sample_rate

    def split_clips(self, audio: Any) -> list[Any]:
        """Cut audio into equal parts of at most the clip limit (no tail too short to encode)."""
        limit = self.max_clip_samples
        parts = max(1, -(-audio.size // limit))
        size = max(1, -(-audio.size // parts))
        return [audio[i : i + size] for i in range(0, audio.size, size)]


# model_type → the module that defines its FAMILY (imported on first use)
_MODULES = {
    "qwen2_audio": "agent.model.qwen2_audio",
    "qwen2_5_omni": "agent.model.qwen2_5_omni",
    "qwen2_5_omni_thinker": "agent.model.qwen2_5_omni",
    "voxtral": "agent.model.voxtral",
}
NAMES = ("qwen2-audio", "qwen2.5-omni", "voxtral")
DEFAULT_MODEL_TYPE = "qwen2_audio"


class UnknownFamily(ValueError):
    pass


def for_model_type(model_type: str | None) -> Family:
    """The family of a checkpoint's `model_type`; None: the default (Qwen2-Audio)."""
    module = _MODULES.get(model_type or DEFAULT_MODEL_TYPE)
    if module is None:
        known = ", ".join(sorted(_MODULES))
        raise UnknownFamily(f"model_type {model_type!r} is not an audio family this agent knows ({known})")
    family: Family = importlib.import_module(module).FAMILY
    return family


def default() -> Family:
    return for_model_type(DEFAULT_MODEL_TYPE)


def all_families() -> list[Family]:
    seen: dict[str, Family] = {}
    for model_type in _MODULES:
        family = for_model_type(model_type)
        seen.setdefault(family.name, family)
    return list(seen.values())


def by_tiny_name(name: str) -> Family | None:
    """The family whose offline random model is called `name` (tiny-random, tiny-random-voxtral…)."""
    for family in all_families():
        if family.tiny == name:
            return family
    return None


def markdown_table() -> str:
    """The families side by side, from their metadata (docs/models.md holds this table)."""
    rows = ["| family | checkpoints (≈ params loaded, bf16 weights) | licence | modes | tools | audio per clip | encoder | --model offline |",
            "|---|---|---|---|---|---|---|---|"]
    for f in all_families():
        points = "<br>".join(f"`{c.hub_id}` ({c.params_b:g} B, {c.bf16_gb:g} GB)" for c in f.checkpoints)
        per_clip = f"≤ {f.max_clip_s} s, {f.audio_token_count(f.sample_rate)} tokens for 1 s"
        rows.append(f"| {f.title} | {points} | {f.licence} | {', '.join(f.modes)} | {f.tools} | {per_clip} | "
                    f"{f.encoder} | `{f.tiny}` |")
    return "\n".join(rows)
