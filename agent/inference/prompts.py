"""Requests → token ids for the engine: the template rendered, each audio expanded to its tokens.

Also the engine's text side: incremental detokenizing, audio identity for history reuse.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.inference.base import AudioRef, GenerationRequest
from agent.model.family import Family
from agent.model.qwen2_audio import FAMILY as QWEN2_AUDIO
from agent.model.qwen2_audio import SPECIAL_RE


class RequestError(Exception):
    """A request the engine refuses (bad audio, empty turn); it never hurts other requests."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Prompt:
    ids: list[int]  # expanded: one id per audio token
    spans: list[tuple[int, int, str]]  # audio token spans [start, end) with the audio's hash
    audios: list[np.ndarray | AudioRef]  # in the order of `spans`; a ref: cached in the worker


def audio_hash(audio: np.ndarray) -> str:
    """Identity of an audio clip for history reuse. Hashed on every turn for the whole
    history, so a fast checksum (crc32 + adler32 + length, ~10x faster than blake2b)."""
    data = np.ascontiguousarray(audio).data.cast("B")
    return f"{audio.size}:{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class SegmentTokenizer:
    """Token ids of a rendered prompt, tokenizing only text it has not seen.

    The tokenizer splits special tokens out before anything else, so a prompt's ids are the
    concatenation of the ids of its pieces between special tokens. A conversation's prompt
    repeats its history's pieces every turn: they come from a bounded memo, and only the new
    turn is tokenized (a 20-turn prompt is otherwise re-tokenized whole at every turn).
    """

    def __init__(self, tokenizer: Any, max_pieces: int = 8192, special_re: re.Pattern[str] = SPECIAL_RE) -> None:
        self.tokenizer = tokenizer
        self.special_re = special_re  # the family's special tokens
        self.max_pieces = max_pieces
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._special: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in self.special_re.finditer(text):
            if match.start() > pos:
                ids += self._piece(text[pos : match.start()])
            ids.append(self._special_id(match.group()))
            pos = match.end()
        if pos < len(text):
            ids += self._piece(text[pos:])
        return ids

    def _special_id(self, token: str) -> int:
        if token not in self._special:
            self._special[token] = int(self.tokenizer.convert_tokens_to_ids(token))
        return self._special[token]

    def _piece(self, text: str) -> list[int]:
        hit = self._memo.get(text)
        if hit is not None:
            self._memo.move_to_end(text)
            return hit
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        self._memo[text] = ids
        if len(self._memo) > self.max_pieces:
            self._memo.popitem(last=False)
        return ids


def build_prompt(tokenizer: Any, audio_token_id: int, request: GenerationRequest,
                 family: Family = QWEN2_AUDIO) -> Prompt:
    """Render the family's template and expand each audio placeholder to its token count (the
    processor's formula, without running the feature extractor)."""
    messages = request.messages
    if not messages:
        raise RequestError("request has no messages")
    last = messages[-1]
    content = last.get("content")
    empty = (not content.strip()) if isinstance(content, str) else not any(
        p.get("type") == "audio" or (p.get("type") == "text" and p.get("text", "").strip())
        for p in (content or []))
    if last.get("role") not in ("user", "tool") or empty:
        raise RequestError("the last turn is empty: nothing to answer")
    ordered: list[np.ndarray | AudioRef] = []
    for message in messages:
        if isinstance(message.get("content"), str):
            continue
        for part in message.get("content") or []:
            if part.get("type") != "audio":
                continue
            index = part.get("audio")
            if not isinstance(index, int) or not 0 <= index < len(request.audios):
                raise RequestError(f"audio part refers to missing audio {index!r}")
            ref = request.audios[index]
            if isinstance(ref, AudioRef):
                if ref.samples <= 0:
                    raise RequestError(f"audio {index} is empty")
                ordered.append(ref)
                continue
            audio = np.ascontiguousarray(ref, dtype=np.float32)
            if audio.ndim != 1 or audio.size == 0:
                raise RequestError(f"audio {index} is empty or not mono (shape {audio.shape})")
            if not np.isfinite(audio).all():
                raise RequestError(f"audio {index} holds NaN or infinite samples")
            ordered.append(audio)
    text = family.render_prompt(messages, True)
    base = tokenizer(text) if isinstance(tokenizer, SegmentTokenizer) else \
        tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    spans: list[tuple[int, int, str]] = []
    for token in base:
        if token != audio_token_id:
            ids.append(token)
            continue
        if len(spans) >= len(ordered):
            raise RequestError("audio placeholders and audio parts do not match")
        clip = ordered[len(spans)]
        size = clip.samples if isinstance(clip, AudioRef) else clip.size
        n = family.audio_token_count(size)
        if n < 2:  # one token would trip the model's legacy (unexpanded) merge path
            raise RequestError(f"audio {len(spans)} is too short ({size} samples)")
        spans.append((len(ids), len(ids) + n, clip.digest if isinstance(clip, AudioRef) else audio_hash(clip)))
        ids.extend([audio_token_id] * n)
    if len(spans) != len(ordered):
        raise RequestError("audio placeholders and audio parts do not match")
    return Prompt(ids, spans, ordered)


def kept_specials(tokenizer: Any, family: Family) -> dict[int, str]:
    """The family's tool-call marker when the tokenizer has it as a special token (Voxtral's
    `[TOOL_CALLS]`): decoding skips special tokens, and the tool parser needs this one."""
    marker = family.tool_syntax.open
    if not family.special_re.fullmatch(marker):
        return {}  # plain text (Hermes' <tool_call>): decoded as it is
    token_id = tokenizer.convert_tokens_to_ids(marker)
    return {} if token_id is None or token_id == tokenizer.unk_token_id else {int(token_id): marker}


class Detokenizer:
    """Incremental decoding that never emits half a multi-byte character.

    Decodes a short window per token, not all ids: the ids since the last emitted text and the
    ones emitted just before, for context (vLLM's prefix/read offsets); the context's own text
    is the previous delta. Byte-level BPE decoding is prefix-stable, so the window's new text is
    what decoding everything would add."""

    def __init__(self, tokenizer: Any, kept: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.kept = kept or {}  # special tokens decoded as their text (a family's tool-call marker)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.prefix = 0  # window start: ids already emitted, kept as context
        self.read = 0  # ids covered by `text`
        self._before: str | None = ""  # decoded ids[prefix:read], when known

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        if self.kept and any(i in self.kept for i in ids):
            out: list[str] = []
            run: list[int] = []
            for i in ids:
                if i in self.kept:
                    out += [self._plain(run), self.kept[i]]
                    run = []
                else:
                    run.append(i)
            return "".join([*out, self._plain(run)])
        return self._plain(ids)

    def _plain(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _emit(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._before if self._before is not None else self._decode(self.ids[self.prefix:self.read])
        cur = self._decode(self.ids[self.prefix:])
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for its other bytes (at
        # most 4 per character, so give up waiting beyond that: the bytes are invalid).
        if not final and cur.endswith("\ufffd") and len(self.ids) - self.read < 4:
            return ""
        delta = cur[len(before):]
        self.text += delta
        self.prefix, self.read = self.read, len(self.ids)
        # ids[prefix:read] decode to `delta` when it ends on a whole character (prefix-stable)
        self._before = None if delta.endswith("\ufffd") or not cur.startswith(before) else delta
        return delta


Answer = tuple[int, list[int], list[int]]  # (position in the prompt, generated ids, ids of its text)


def splice_answers(prompt: Prompt, answers: list[Answer]) -> tuple[Prompt, list[Answer]]:
    """Put the ids the model generated back in place of its answers' re-tokenized text.

    A session sends the answer as text; tokenizing it again need not give the generated ids
    (bytes that are not UTF-8, special tokens dropped by decoding, non-canonical BPE splits),
    and the cached KV of that history would then be lost from that answer on. Each answer is
    spliced only where the prompt holds exactly its text's ids at its position, the prompt
    before it being what the cache covers; the first that does not match ends the splicing.
    Returns the prompt and the answers applied (positions in the returned prompt)."""
    ids, spans, applied = prompt.ids, prompt.spans, []
    for pos, generated, text_ids in answers:
        if ids[pos:pos + len(text_ids)] != text_ids:
            break
        shift = len(generated) - len(text_ids)
        if shift or generated != text_ids:
            ids = ids[:pos] + generated + ids[pos + len(text_ids):]
            spans = [(s + shift, e + shift, h) if s >= pos else (s, e, h) for s, e, h in spans]
        applied.append((pos, generated, text_ids))
    return Prompt(ids, spans, prompt.audios), applied
