"""Run a suite through the live pipeline: each case is a session (VAD, turns, tools, the
backend, speech out when configured), several at once; a case with a transcript expectation
gets a second session where every turn is analysis with the transcription instruction.

`--backend scripted` answers each case from its own `scripted:` block (or the `--script`
file), so an offline suite can still tell cases apart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import events as ev
from agent.audio import read_file, to_mono16k
from agent.eval import metrics
from agent.eval.suite import Case, Suite, SuiteError
from agent.inference.base import GenerationRequest
from agent.inference.scripted import Script, ScriptedBackend
from agent.model.qwen2_audio import SAMPLE_RATE

FEED_SAMPLES = 16000  # one second per push, as `voice-agent run`
ASR_SUFFIX = "~asr"


# ---- audio ------------------------------------------------------------------------------
async def _speak(text: str, engine: Any) -> np.ndarray:
    pieces = [np.asarray(p, dtype=np.int16) async for p in engine.synthesize(text)]
    audio = to_mono16k(np.concatenate(pieces), engine.sample_rate)
    voiced = np.flatnonzero(np.abs(audio) > 1e-3)  # espeak pads with silence: the suite says how much
    return audio[voiced[0] : voiced[-1] + 1] if voiced.size else audio


async def case_audio(suite: Suite, case: Case, speaker: Any) -> np.ndarray:
    """The case's 16 kHz mono audio: files joined by `gap_s` of silence, or speech made now."""
    gap = np.zeros(int(suite.gap_s * SAMPLE_RATE), np.float32)
    parts: list[np.ndarray] = []
    if case.speak is not None:
        for part in case.speak:
            if isinstance(part, str):
                parts.append(await _speak(part, speaker))
            else:
                parts.append(np.zeros(int(part * SAMPLE_RATE), np.float32))
    else:
        for i, name in enumerate(case.audio_files()):
            if i:
                parts.append(gap)
            parts.append(await asyncio.to_thread(read_file, suite.resolve(name)))
    return np.concatenate(parts).astype(np.float32)


async def start_speaker(suite: Suite) -> Any:
    """espeak-ng for `speak:` cases (None when no case needs it)."""
    if not any(c.speak is not None for c in suite.cases):
        return None
    from agent.speech.base import TTSError, TTSSettings, load_engine

    try:
        engine = load_engine(TTSSettings(engine="espeak"))
        assert engine is not None
        await engine.start()
    except TTSError as exc:
        raise SuiteError(f"`speak:` cases need espeak-ng: {exc}") from None
    return engine


# ---- the scripted backend, per case ----------------------------------------------------
class CaseScriptedBackend(ScriptedBackend):
    """Replays each case's own `scripted:` answers (its sessions are named after the case);
    the transcription session gets the case's `scripted.transcript`."""

    def __init__(self, suite: Suite, fallback: Script | None) -> None:
        """`fallback`: the `--script` file, for cases without `scripted:` answers."""
        if fallback is not None:
            super().__init__(chunk=fallback.chunk, delay=fallback.delay_s, default=fallback.default,
                             turns=fallback.rounds(), source=f"the suite {suite.path.name}")
        else:
            super().__init__(chunk=3, delay=0.01, default=str(Script.model_fields["default"].default), turns=[],
                             source=f"the suite {suite.path.name}")
        self._cases: dict[str, list[list[str]]] = {}
        for case in suite.cases:
            s = case.scripted
            if s is not None and s.turns:
                self._cases[case.id] = Script(turns=s.turns).rounds()
            if s is not None and s.transcript is not None:
                texts = [s.transcript] if isinstance(s.transcript, str) else s.transcript
                self._cases[case.id + ASR_SUFFIX] = [[t] for t in texts]
        self.session_case: dict[str, str] = {}  # session id → case id (+ ASR_SUFFIX)

    def _next_output(self, request: GenerationRequest) -> str | BaseException:
        key = self.session_case.get(request.session_id)
        if key is None or key not in self._cases:
            return super()._next_output(request)
        saved, self.turns = self.turns, self._cases[key]
        try:  # synchronous: no other session can see the swap
            return super()._next_output(request)
        finally:
            self.turns = saved


# ---- one case ----------------------------------------------------------------------------
@dataclass
class Observed:
    """What one session did."""

    turns: list[tuple[float, float]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    first_audio_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turn_ids: list[str] = field(default_factory=list)
    _first_token: dict[str, float] = field(default_factory=dict)

    def see(self, event: ev.Event) -> None:
        if isinstance(event, ev.TurnCommitted):
            self.turns.append((round(event.start, 3), round(event.end, 3)))
            self.turn_ids.append(event.turn_id)
        elif isinstance(event, ev.ToolCall):
            self.tool_calls.append({"name": event.name, "arguments": event.arguments})
        elif isinstance(event, ev.ResponseDone):
            self.answers.append(event.text)
            if "first_token" in event.timings:
                self.first_token_s.append(event.timings["first_token"])
        elif isinstance(event, ev.ResponseAudioDone):
            # Time to first audio: the answer's first token, then the TTS's first audio after it.
            first_audio = event.timings.get("tts_first_audio_s")
            token = self._first_token.get(event.turn_id)
            if first_audio is not None and token is not None:
                self.first_audio_s.append(token + first_audio)
        elif isinstance(event, ev.Error):
            self.errors.append(f"[{event.code}] {event.message}")
        if isinstance(event, ev.ResponseDone) and "first_token" in event.timings:
            self._first_token[event.turn_id] = event.timings["first_token"]


async def _session(runtime: Any, session_id: str, audio: np.ndarray, instruction: str | None) -> Observed:
    session, events = runtime.open_session(session_id, instruction=instruction, wait_for_responses=True,
                                           voice_output="offline" if runtime.tts is not None else "none")
    seen = Observed()

    async def collect() -> None:
        async for event in events:
            seen.see(event)
            if isinstance(event, ev.SessionEnded):
                return

    collecting = asyncio.create_task(collect())
    try:
        for i in range(0, audio.size, FEED_SAMPLES):
            await session.push_audio(audio[i : i + FEED_SAMPLES])
        await session.finish()
    finally:
        await session.close("end_of_case")
        await asyncio.wait_for(collecting, timeout=60)
        events.close()
    return seen


async def run_case(suite: Suite, case: Case, runtime: Any, audio: np.ndarray, tag: str,
                   backend: CaseScriptedBackend | None) -> dict[str, Any]:
    expect = case.expect
    sid = f"{case.id}-{tag}"
    if backend is not None:
        backend.session_case[sid] = case.id
        backend.session_case[sid + ASR_SUFFIX] = case.id + ASR_SUFFIX
    started = time.monotonic()
    seen = await _session(runtime, sid, audio, case.instruction)
    failures: list[str] = [f"error {e}" for e in seen.errors]
    checks: dict[str, Any] = {}
    reference = expect.transcript_text()
    if reference is not None:
        asr = await _session(runtime, sid + ASR_SUFFIX, audio, suite.transcribe_instruction)
        hypothesis = " ".join(a.strip() for a in asr.answers)
        errors, words = metrics.word_errors(reference, hypothesis)
        value = metrics.wer(errors, words)
        ok = value <= suite.max_wer(case) and not asr.errors
        checks["transcript"] = {"passed": ok, "wer": value, "errors": errors, "words": words,
                                "reference": reference, "hypothesis": hypothesis}
        if asr.errors:
            failures.append(f"transcription: error {asr.errors[0]}")
        elif not ok:
            failures.append(f"transcript WER {value:.2f} > {suite.max_wer(case):.2f}: heard {hypothesis!r}, "
                            f"expected {reference!r}")
    wanted = expect.tool_calls()
    if wanted:
        hits = [metrics.tool_call_matches(w, seen.tool_calls) for w in wanted]
        checks["tool_call"] = {"passed": all(hits), "expected": len(wanted), "matched": sum(hits)}
        for w, hit in zip(wanted, hits, strict=True):
            if not hit:
                failures.append(f"no tool call {w.name}({w.arguments}); calls were {seen.tool_calls or 'none'}")
    if expect.answer is not None:
        text = " ".join(a.strip() for a in seen.answers)
        problem = metrics.answer_problem(expect.answer, text)
        checks["answer"] = {"passed": problem is None, "analysis": case.instruction is not None}
        if problem:
            failures.append(problem)
    if expect.turns is not None:
        problem = metrics.turns_problem(expect.turns, seen.turns, expect.tolerance_s)
        checks["turns"] = {"passed": problem is None}
        if problem:
            failures.append(problem)
    budget = suite.latency(case)
    if budget is not None:
        late = []
        if budget.first_token_s is not None:
            late += [f"first token {t * 1000:.0f} ms > {budget.first_token_s * 1000:.0f} ms"
                     for t in seen.first_token_s if t > budget.first_token_s]
        if budget.first_audio_s is not None:
            if not seen.first_audio_s:
                late.append("no audio answer (first_audio_s needs a TTS engine)")
            late += [f"first audio {t * 1000:.0f} ms > {budget.first_audio_s * 1000:.0f} ms"
                     for t in seen.first_audio_s if t > budget.first_audio_s]
        checks["latency"] = {"passed": not late}
        failures += late
    return {"id": case.id, "passed": not failures, "failures": failures, "checks": checks,
            "instruction": case.instruction, "turns": seen.turns, "answers": seen.answers,
            "tool_calls": seen.tool_calls, "first_token_s": seen.first_token_s,
            "first_audio_s": seen.first_audio_s, "duration_s": round(audio.size / SAMPLE_RATE, 3),
            "wall_s": round(time.monotonic() - started, 3), "session_id": sid}


async def run_suite(suite: Suite, runtime: Any, backend: CaseScriptedBackend | None = None,
                    concurrency: int | None = None) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Every case's result (in suite order) and its audio; `runtime` is started."""
    speaker = await start_speaker(suite)
    try:
        audios = {c.id: await case_audio(suite, c, speaker) for c in suite.cases}
    finally:
        if speaker is not None:
            await speaker.aclose()
    tag = uuid.uuid4().hex[:6]
    gate = asyncio.Semaphore(concurrency or suite.concurrency)

    async def one(case: Case) -> dict[str, Any]:
        async with gate:
            return await run_case(suite, case, runtime, audios[case.id], tag, backend)

    results = await asyncio.gather(*(one(c) for c in suite.cases))
    return list(results), audios
