"""Short spoken commands over the agent's voice: "stop", "wait", "hold on" cancel the answer,
while "yeah", "mm-hm", "okay" (backchannels) still never do.

Acoustic cues cannot tell "stop" from "yeah": both are one short syllable. The `commands`
detector (`turns.backchannel: commands`, the default) therefore listens to the words:

- speech that the feature detector already calls an interruption (long, content, loud) is one;
- short speech, once it has ended, goes to a keyword spotter that picks, among the command
  phrases (`turns.commands`) and the backchannel phrases (`turns.backchannel_words`), the one
  it heard; a command cancels the answer (`Verdict.COMMAND`), anything else is left to the
  feature detector (a backchannel).

The spotter is PocketSphinx (PyPI `pocketsphinx`, the `commands` extra), whose wheel ships a
US English acoustic model and dictionary: offline, no download, ~50 ms for a one-word clip on
one core, run once per overlap. Loading it takes 1–4 s, so it is loaded once per process and set
of phrases, in a thread, when the first session starts (`preload`); until it is there, short
speech is judged as by the feature detector. Without the package the detector logs a warning
and is the feature detector. Any other spotter (e.g. one asking the running model to transcribe the overlap)
plugs in as `CommandDetector(config, spotter=...)` with `spot(audio) -> phrase | None`.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from agent.speech.backchannel import SAMPLE_RATE, BargeInConfig, FeatureDetector, Features, OverlapSpeech
from agent.speech.overlap import Verdict

log = logging.getLogger(__name__)

DEFAULT_COMMANDS = ("stop", "wait", "hold on", "no", "cancel", "pause", "be quiet")
DEFAULT_BACKCHANNELS = ("yeah", "uh huh", "mm hm", "right", "okay", "sure", "i see")
COMMAND_SILENCE_S = 0.09  # silence after the speech before it is spotted (the resume waits 0.5 s)
# pronunciations the dictionary lacks or spells otherwise (ARPAbet)
EXTRA_WORDS = {"mm": "M", "hm": "HH M", "mhm": "M HH M", "mmhm": "M HH M", "uhhuh": "AH HH AH"}


def normalise(phrase: str) -> str:
    """Lower case, words only: "Mm-hm!" → "mm hm"."""
    return " ".join(re.findall(r"[a-z']+", phrase.lower()))


class Spotter(Protocol):
    def spot(self, audio: np.ndarray) -> str | None:
        """The phrase heard in `audio` (16 kHz mono float32), normalised; None: nothing."""
        ...


class PocketSphinxSpotter:
    """Forced choice among the given phrases (a JSGF grammar); the pocketsphinx wheel's own
    en-us model. A grammar that stops short returns its phrase by its first word."""

    def __init__(self, phrases: list[str]) -> None:
        from pocketsphinx import Decoder  # the `commands` extra

        self.phrases = sorted({normalise(p) for p in phrases if normalise(p)})
        self.decoder = Decoder(lm=None, logfn="/dev/null", samprate=SAMPLE_RATE)
        for word, phones in EXTRA_WORDS.items():
            if self.decoder.lookup_word(word) is None:
                self.decoder.add_word(word, phones, True)
        known = [p for p in self.phrases if all(self.decoder.lookup_word(w) is not None for w in p.split())]
        if missing := sorted(set(self.phrases) - set(known)):
            log.warning("command spotter: no pronunciation for %s; those phrases are not spotted", missing)
        self.phrases = known
        grammar = "#JSGF V1.0;\ngrammar words;\npublic <phrase> = " + " | ".join(known) + ";\n"
        self.decoder.add_jsgf_string("words", grammar)
        self.decoder.activate_search("words")

    def spot(self, audio: np.ndarray) -> str | None:
        # a faint dither: digital silence (log of zero energy) upsets the feature normalisation
        noise = np.random.default_rng(0).normal(0.0, 3e-4, audio.size)
        pcm = (np.clip(audio + noise, -1, 1) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        heard = normalise(hyp.hypstr) if hyp is not None else ""
        if not heard or heard in self.phrases:
            return heard or None
        same_start = [p for p in self.phrases if p.split()[0] == heard.split()[0]]
        return same_start[0] if len(same_start) == 1 else heard


_LOADED: dict[tuple[str, ...], Future[Spotter]] = {}
_LOCK = threading.Lock()


def preload(config: BargeInConfig) -> Future[Spotter] | None:
    """The shared spotter for `config`'s phrases, loading in a thread (None: no pocketsphinx)."""
    if importlib.util.find_spec("pocketsphinx") is None:
        return None
    phrases = tuple(sorted({normalise(p) for p in (*config.commands, *config.backchannel_words) if normalise(p)}))
    with _LOCK:
        if phrases not in _LOADED:
            future: Future[Spotter] = Future()

            def load() -> None:
                try:
                    future.set_result(PocketSphinxSpotter(list(phrases)))
                except BaseException as exc:
                    log.exception("command spotter failed to load")
                    future.set_exception(exc)

            threading.Thread(target=load, name="command-spotter-load", daemon=True).start()
            _LOADED[phrases] = future
        return _LOADED[phrases]


class CommandDetector:
    """The feature detector, plus a keyword spotter for short commands (module doc)."""

    def __init__(self, config: BargeInConfig, spotter: Spotter | None = None) -> None:
        self.config = config
        self.features = FeatureDetector(config)
        self.commands = {normalise(c) for c in config.commands if normalise(c)}
        self._loading: Future[Spotter] | None = None
        self.spotter: Spotter | None = spotter
        if spotter is None:
            self.spotter = self._default_spotter()
        self._key: tuple[int, int] | None = None  # the speech last spotted (its length, its first sample)
        self._heard: str | None = None
        self.heard: str | None = None  # what the spotter heard in the latest overlap (for the event)

    def _default_spotter(self) -> Spotter | None:
        self._loading = preload(self.config)
        if self._loading is None:
            log.warning("turns.backchannel=commands needs pocketsphinx (pip install 'qwen-voice-agent[commands]'); "
                        "short commands are taken for backchannels")
            return None
        return self._loaded(0.0)

    def _loaded(self, timeout: float | None) -> Spotter | None:
        """The shared spotter once loaded (waiting up to `timeout` s; None: wait for ever)."""
        if self.spotter is None and self._loading is not None:
            try:
                self.spotter = self._loading.result(timeout)
            except TimeoutError:
                return None
            except Exception:
                self._loading = None  # logged where it failed: the feature detector decides
        return self.spotter

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until the spotter is loaded (tests, start-up); whether there is one."""
        return self._loaded(timeout) is not None

    @property
    def last(self) -> Features | None:
        return self.features.last

    def judge(self, speech: OverlapSpeech) -> Verdict:
        verdict = self.features.judge(speech)
        if verdict is Verdict.INTERRUPTION or self._loaded(0.0) is None or not speech.ended \
                or speech.audio.size - speech.speech_part().size < COMMAND_SILENCE_S * SAMPLE_RATE:
            return verdict  # a dip inside a word is no end of it: the spotter waits for a little silence
        heard = self._spot(speech)
        if heard is not None and heard in self.commands:
            if self.features.last is not None:
                self.features.last.reasons.append("command")
            return Verdict.COMMAND
        return verdict

    def _spot(self, speech: OverlapSpeech) -> str | None:
        """Once per speech: the judge is asked again every chunk while the voice is paused."""
        part = speech.speech_part()
        key = (part.size, int(part[0] * 32767) if part.size else 0)
        if key != self._key:
            assert self.spotter is not None
            tail = np.zeros(int(0.1 * SAMPLE_RATE), np.float32)  # the word's release, then silence
            after = speech.audio[part.size : part.size + tail.size]
            tail[: after.size] = after
            self._key, self._heard = key, self.spotter.spot(np.concatenate([speech.preroll, part, tail]))
            self.heard = self._heard
            log.info("command spotter heard %r in %.2f s of speech over the answer", self._heard, speech.duration_s)
        return self._heard
