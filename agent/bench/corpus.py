"""A corpus of real human speech for turn-taking, built from Debian packages at bench/test time.

Nothing here is vendored: `fetch()` downloads the packages with `apt-get download` into a
cache directory (`$VOICE_AGENT_CORPUS_DIR`, default `~/.cache/voice-agent/corpus`) and unpacks
them with `dpkg -x`; no package is installed.

Source: `asterisk-core-sounds-en-wav` (Allison Smith's recordings of the Asterisk prompts,
8 kHz, CC-BY-SA-3.0: `LICENCES` below) with the prompts' texts from `asterisk-core-sounds-en`
(`core-sounds-en.txt`). Every word is placed in time by a forced aligner that needs no
download: pocketsphinx (PyPI, BSD-2) with the en-us acoustic model and dictionary its wheel
ships, aligning the recording to the known transcript. A prompt whose words are not all in
the dictionary, or that the aligner cannot align, is left out.

Cases, all of them from real speech:
- `statement` / `question`: one whole sentence of a prompt, as spoken (its own pauses kept),
  ending at the gap after its last word — a finished turn;
- `mid_sentence`: the same sentence cut at the word boundary in its middle (the aligner's end of
  a word) and continued after an inserted pause — an unfinished turn; a commit inside the pause
  cuts the speaker off. The pause is the recording's own background (`room_tone`).
No package here ships a transcribed filler ("um", "uh"): there is no filler case in this corpus
(`bench latency` and `bench turns` without `--corpus` test espeak's "um").

The split is fixed by prompt (a hash of its name): `calibrate` tunes the end-of-turn policy,
`held_out` reports it; every case of one prompt falls on the same side.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.eot.policy import room_tone
from agent.model.qwen2_audio import SAMPLE_RATE

PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en")
SOUNDS = "usr/share/asterisk/sounds/en_US_f_Allison"
TRANSCRIPTS = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
LICENCES = {
    "asterisk-core-sounds-en-wav": "CC-BY-SA-3.0, recorded by Allison Smith (Debian copyright file)",
    "asterisk-core-sounds-en": "CC-BY-SA-3.0 (the prompts' texts)",
    "pocketsphinx": "BSD-2-Clause (the aligner and its en-us model, from its PyPI wheel)",
}
ALIGNER_VERSION = 2  # bump when the alignment changes: cached alignments are redone
PAUSES = (0.3, 0.5, 0.8, 1.2)  # pauses inserted in mid-sentence cases (s)
MIN_WORDS = 2  # shorter sentences are no case
MIN_WORDS_CUT = 4  # a mid-sentence cut needs two words on each side


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # s, in the prompt's recording
    end: float


@dataclass
class Sentence:
    prompt: str  # the prompt's file name, without .wav
    index: int  # which sentence of the prompt
    text: str
    words: list[Word]
    audio: np.ndarray = field(repr=False)  # the sentence and the gaps around it, 16 kHz
    offset: float  # where `audio` starts in the prompt (s)

    @property
    def kind(self) -> str:
        return "question" if self.text.rstrip().endswith("?") else "statement"

    @property
    def split(self) -> str:
        return split_of(self.prompt)


@dataclass
class Case:
    id: str
    kind: str  # statement | question | mid_sentence
    split: str  # calibrate | held_out
    text: str
    audio: np.ndarray = field(repr=False)  # 16 kHz, from the first word's gap to the last word's end
    parts: list[tuple[float, float]]  # spoken parts (s in `audio`); a commit before the last one's start is premature


def split_of(prompt: str) -> str:
    return "held_out" if hashlib.sha1(prompt.encode()).digest()[0] % 2 else "calibrate"


def cache_dir() -> Path:
    return Path(os.environ.get("VOICE_AGENT_CORPUS_DIR") or Path.home() / ".cache" / "voice-agent" / "corpus")


def fetch(root: Path | None = None) -> Path:
    """Download and unpack the packages (once); the directory that holds their files."""
    root = root or cache_dir()
    tree = root / "debian"
    if (tree / ".done").exists():
        return tree
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("the real-speech corpus needs apt-get and dpkg (Debian or Ubuntu)")
    tree.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        run = subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if run.returncode != 0 or len(debs) != len(PACKAGES):
            raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed: {run.stderr.strip()[-500:]}")
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True, capture_output=True)
    (tree / ".done").write_text("\n".join(f"{k}: {v}" for k, v in LICENCES.items()) + "\n")
    return tree


def transcripts(tree: Path) -> dict[str, str]:
    """Prompt name → its text, for the top-level prompts with a recording."""
    out = {}
    with gzip.open(tree / TRANSCRIPTS, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            name, sep, text = line.partition(":")
            if not sep or line.startswith(";") or "/" in name:
                continue
            if (tree / SOUNDS / f"{name.strip()}.wav").exists():
                out[name.strip()] = text.strip()
    return out


def words_of(text: str) -> list[str] | None:
    """The words an aligner is given; None for texts it cannot take (digits, keys, tones)."""
    if re.search(r"[\[\]0-9#*@/]", text):
        return None
    words = [w.strip("'").lower() for w in re.split(r"[^A-Za-z']+", text)]
    return [w for w in words if w]


def sentences_of(text: str) -> list[str]:
    """Split at `.`, `?` or `!` followed by a space; an ellipsis ends no sentence."""
    parts = re.split(r"(?<=[.?!])\s+", text.strip())
    out: list[str] = []
    for part in parts:
        if out and out[-1].endswith("..."):
            out[-1] += " " + part
        else:
            out.append(part)
    return [p for p in out if words_of(p)]


class Aligner:
    """pocketsphinx forced alignment of a known transcript (16 kHz; the en-us model in its wheel)."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", lm=None)

    def known(self, word: str) -> bool:
        return bool(self._decoder.lookup_word(word))

    def align(self, audio: np.ndarray, words: list[str]) -> list[Word] | None:
        """One Word per word of `words`, or None when the aligner could not follow the text."""
        d = self._decoder
        try:
            d.set_align_text(" ".join(words))
            d.start_utt()
            d.process_raw((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
            d.end_utt()
            segs = [(re.sub(r"\(\d+\)$", "", s.word), s.start_frame, s.end_frame) for s in d.seg() or []]
        except RuntimeError:
            return None
        aligned = [Word(w, a / 100, (b + 1) / 100) for w, a, b in segs if w not in ("<s>", "</s>", "<sil>")
                   and not w.startswith("[") and not w.startswith("++")]
        if [w.text for w in aligned] != words:
            return None
        return aligned


def _alignments(tree: Path, texts: dict[str, str], root: Path) -> dict[str, list[Word]]:
    """Aligned words per prompt, cached in `alignments.json` beside the packages."""
    from agent.audio import read_file

    path = root / "alignments.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if cached.get("version") != ALIGNER_VERSION:
        cached = {"version": ALIGNER_VERSION, "prompts": {}}
    prompts: dict[str, Any] = cached["prompts"]
    aligner: Aligner | None = None
    changed = False
    for name, text in texts.items():
        words = words_of(text)
        key = hashlib.sha1(text.encode()).hexdigest()[:12]
        if name in prompts and prompts[name]["key"] == key:
            continue
        aligned = None
        if words and len(words) >= MIN_WORDS:
            aligner = aligner or Aligner()
            if all(aligner.known(w) for w in words):
                aligned = aligner.align(read_file(tree / SOUNDS / f"{name}.wav"), words)
        prompts[name] = {"key": key, "words": None if aligned is None else [[w.text, w.start, w.end] for w in aligned]}
        changed = True
    if changed:
        path.write_text(json.dumps(cached))
    return {n: [Word(*w) for w in p["words"]] for n, p in prompts.items() if n in texts and p["words"]}


def sentences(root: Path | None = None) -> list[Sentence]:
    """Every sentence of MIN_WORDS words or more of every aligned prompt."""
    from agent.audio import read_file

    root = root or cache_dir()
    tree = fetch(root)
    texts = transcripts(tree)
    out = []
    for name, words in sorted(_alignments(tree, texts, root).items()):
        audio = read_file(tree / SOUNDS / f"{name}.wav")
        out += split_sentences(name, texts[name], words, audio)
    return out


def split_sentences(name: str, text: str, words: list[Word], audio: np.ndarray) -> list[Sentence]:
    """A prompt's aligned words grouped by sentence; each sentence's audio runs from the middle
    of the gap before its first word to the middle of the gap after its last one."""
    out, i = [], 0
    spans = []
    for index, sentence in enumerate(sentences_of(text)):
        n = len(words_of(sentence) or [])
        spans.append((index, sentence, words[i : i + n]))
        i += n
    duration = audio.size / SAMPLE_RATE
    for k, (index, sentence, ws) in enumerate(spans):
        if len(ws) < MIN_WORDS:
            continue
        before = (spans[k - 1][2][-1].end + ws[0].start) / 2 if k and spans[k - 1][2] else 0.0
        after = (ws[-1].end + spans[k + 1][2][0].start) / 2 if k + 1 < len(spans) and spans[k + 1][2] else duration
        a, b = round(before * SAMPLE_RATE), round(after * SAMPLE_RATE)
        shifted = [Word(w.text, w.start - before, w.end - before) for w in ws]
        out.append(Sentence(name, index, sentence, shifted, audio[a:b].astype(np.float32), before))
    return out


def cases(sentences: list[Sentence], pauses: tuple[float, ...] = PAUSES) -> Iterator[Case]:
    """Per sentence: the whole sentence (finished), and, from MIN_WORDS_CUT words, the sentence cut
    after its middle word and continued after each pause (unfinished until the second part starts)."""
    for s in sentences:
        sid = f"{s.prompt}#{s.index}"
        first, last = s.words[0].start, s.words[-1].end
        end = min(s.audio.size, round(last * SAMPLE_RATE))
        yield Case(sid, s.kind, s.split, s.text, s.audio[:end], [(first, last)])
        if len(s.words) < MIN_WORDS_CUT:
            continue
        k = len(s.words) // 2  # cut after word k-1: at least two words on each side
        cut, resume = round(s.words[k - 1].end * SAMPLE_RATE), round(s.words[k].start * SAMPLE_RATE)
        head, tail = s.audio[:cut], s.audio[resume:end]
        said = " ".join(w.text for w in s.words[:k]), " ".join(w.text for w in s.words[k:])
        for pause in pauses:
            gap = room_tone(s.audio, pause)
            t = (head.size + gap.size) / SAMPLE_RATE
            yield Case(f"{sid}/pause{pause}", "mid_sentence", s.split, f"{said[0]} … {said[1]}",
                       np.concatenate([head, gap, tail]), [(first, head.size / SAMPLE_RATE),
                                                           (t, t + tail.size / SAMPLE_RATE)])
