"""Cut streamed answer text into speakable pieces, so speech starts after the first clause.

A piece ends at a sentence end (. ! ? … and CJK 。！？) once it holds `min_sentence_chars`,
at a clause end (, ; : – —) or a line break once it holds `min_clause_chars`, or at the
last space before `max_chars`. A boundary is only taken once the next character is seen
("3.5", "Dr. Smith" stay whole). Tool-call markup (`<tool_call>…</tool_call>`,
`<tool_response>…</tool_response>`) and model special tokens never reach the voice, even
split across deltas; an unclosed block is dropped at the end.

Each piece keeps `text` (the answer's own characters, markup removed: what the user hears,
for `spoken_text` and history truncation) and `speak` (what the engine gets: markdown
symbols and extra whitespace removed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_END = ".!?…。！？"
CLAUSE_END = ",;:–—，；："
NO_SPACE_NEEDED = "。！？，；：\n"  # CJK punctuation and line breaks end a piece without a following space
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e", "no", "approx"})
BLOCKS = (("<tool_call>", "</tool_call>"), ("<tool_response>", "</tool_response>"))
SPECIAL = re.compile(r"<\|[a-z_]+\|>", re.IGNORECASE)
_MARKDOWN = re.compile(r"(\*\*?|__|`+|^#+\s*|^\s*[-*+]\s+|^\s*>\s*)", re.MULTILINE)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Piece:
    text: str  # the answer's characters this piece covers (tool markup removed)
    speak: str  # what the engine is given


def speakable(text: str) -> str:
    """The engine's input: markdown emphasis, code ticks, headings and bullets out, spaces squeezed."""
    return _SPACES.sub(" ", _MARKDOWN.sub(" ", text)).strip()


class TextChunker:
    def __init__(self, min_sentence_chars: int = 8, min_clause_chars: int = 24, max_chars: int = 200) -> None:
        if not 0 < min_sentence_chars <= max_chars or not 0 < min_clause_chars <= max_chars:
            raise ValueError("need 0 < min_*_chars <= max_chars")
        self.min_sentence_chars = min_sentence_chars
        self.min_clause_chars = min_clause_chars
        self.max_chars = max_chars
        self._raw = ""  # not yet filtered: may end inside a tag
        self._buf = ""  # filtered text not yet cut into pieces
        self._skip_until: str | None = None  # inside a tool block: the closing tag
        self._carry = ""  # cut-off text with nothing to say, joined to the next piece
        self._pending_space = False  # markup was removed: the next text may need a space
        self.dropped_markup = 0  # characters of tool markup kept from the voice

    def push(self, delta: str) -> list[Piece]:
        """Feed one `response.delta`; returns the pieces it completes (often none)."""
        self._raw += delta
        self._filter(final=False)
        return self._cut(final=False)

    def flush(self) -> list[Piece]:
        """The answer is complete: the rest, as pieces (an unclosed tool block is dropped)."""
        self._filter(final=True)
        if self._skip_until is not None:
            self.dropped_markup += len(self._raw)
            self._raw, self._skip_until = "", None
        return self._cut(final=True)

    def _filter(self, final: bool) -> None:
        raw, out = self._raw, list[str]()
        while raw:
            if self._skip_until is not None:
                end = raw.find(self._skip_until)
                if end < 0:
                    # keep only a tail that may be the start of the closing tag
                    keep = _partial_tag_len(raw, (self._skip_until,))
                    self.dropped_markup += len(raw) - keep
                    raw = raw[len(raw) - keep :] if keep else ""
                    break
                self.dropped_markup += end + len(self._skip_until)
                raw, self._skip_until = raw[end + len(self._skip_until) :], None
                self._pending_space = True
                continue
            lt = raw.find("<")
            if lt != 0:
                self._emit(out, raw if lt < 0 else raw[:lt])
            if lt < 0:
                raw = ""
                break
            raw = raw[lt:]
            opened = next((close for open_, close in BLOCKS if raw.startswith(open_)), None)
            if opened is not None:
                self._skip_until = opened
                self.dropped_markup += raw.index(">") + 1
                raw = raw[raw.index(">") + 1 :]
                continue
            stray = next((close for _, close in BLOCKS if raw.startswith(close)), None) or \
                (m.group(0) if (m := SPECIAL.match(raw)) else None)
            if stray is not None:  # a closing tag without its opening one, or <|im_end|>
                self.dropped_markup += len(stray)
                raw = raw[len(stray) :]
                continue
            if _could_be_tag(raw):
                if not final:
                    break  # wait for more text before deciding
                if len(raw) > 1:  # the answer ended inside a tag: never speak it
                    self.dropped_markup += len(raw)
                    raw = ""
                    break
            self._emit(out, "<")
            raw = raw[1:]
        self._raw = raw
        self._buf += "".join(out)

    def _emit(self, out: list[str], text: str) -> None:
        """Append text; where markup was removed between two words, one space goes between them
        (so "on.<tool_call>…</tool_call>Done" is two pieces, not "on.Done")."""
        if self._pending_space:
            before = (out[-1][-1:] if out and out[-1] else self._buf[-1:]) or " "
            if not before.isspace() and not text[:1].isspace():
                out.append(" ")
            self._pending_space = False
        out.append(text)

    def _cut(self, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while (end := self._boundary(final)) is not None:
            text, self._buf = self._buf[:end], self._buf[end:]
            speak = speakable(text)
            if any(c.isalnum() for c in speak):
                pieces.append(Piece(self._carry + text, speak))
                self._carry = ""
            else:  # punctuation or space only: it joins the next piece's text, it is no piece itself
                self._carry += text
        if final:
            self._carry = ""
        return pieces

    def _boundary(self, final: bool) -> int | None:
        """Where the next piece ends in the buffer (exclusive), or None to wait for more."""
        buf = self._buf
        for i, ch in enumerate(buf):
            if i + 1 >= self.max_chars:
                space = buf.rfind(" ", 0, i + 1)
                return space + 1 if space > 0 else i + 1
            if ch not in SENTENCE_END and ch not in CLAUSE_END and ch != "\n":
                continue
            nxt = buf[i + 1] if i + 1 < len(buf) else None
            if nxt is None and not final:
                return None  # "3." may become "3.5": wait
            if ch not in NO_SPACE_NEEDED and nxt is not None and not nxt.isspace():
                continue
            size = len(buf[: i + 1].strip())
            sentence = ch in SENTENCE_END or ch == "\n"
            if sentence and ch == "." and _abbreviation(buf[: i + 1]):
                continue
            if size >= (self.min_sentence_chars if sentence else self.min_clause_chars):
                end = i + 1
                while end < len(buf) and buf[end] in SENTENCE_END + "\"')]”’»":
                    end += 1  # "?!" and closing quotes stay with their piece
                while end < len(buf) and buf[end].isspace():
                    end += 1  # the space after it too, so pieces join back to the text
                return end
        if final and buf:
            return len(buf)
        return None


def _abbreviation(text: str) -> bool:
    word = text[:-1].rsplit(None, 1)[-1].lower() if text[:-1].strip() else ""
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha() and word not in "ia")  # initials


def _could_be_tag(raw: str) -> bool:
    """Whether text starting with "<" may still grow into a tool tag or special token."""
    candidates = [t for pair in BLOCKS for t in pair] + ["<|"]
    if any(t.startswith(raw) for t in candidates):
        return True
    return raw.startswith("<|") and "|>" not in raw and len(raw) < 32


def _partial_tag_len(raw: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `raw` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(1, len(tag)):
            if raw.endswith(tag[:n]):
                best = max(best, n)
    return best
