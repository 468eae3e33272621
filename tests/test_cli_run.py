"""`voice-agent run` as a user runs it: a subprocess, files in, events out."""

import json
import subprocess
import sys

import pytest

from agent.events import parse_event


def voice_agent(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_files_give_one_line_error_and_exit_2(tmp_path, speech_two):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "readme.wav"
    text.write_text("not audio\n" * 50)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(speech_two.path.read_bytes()[:20000])
    for bad in [tmp_path / "missing.wav", empty, text, cut]:
        proc = voice_agent("run", "--model", "tiny-random", str(speech_two.path), str(bad), timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("turns:\n  min_silence_s: 99\n")
    proc = voice_agent("run", "--config", str(cfg), "x.wav", timeout=60)
    assert proc.returncode == 2 and "turns.min_silence_s" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_jsonl_events_of_a_two_turn_file(speech_two):
    proc = voice_agent("run", "--model", "tiny-random", "--max-new-tokens", "6", "--jsonl", str(speech_two.path))
    assert proc.returncode == 0, proc.stderr
    events = [parse_event(line) for line in proc.stdout.splitlines()]
    types = [e.type for e in events]
    assert types[0] == "session.started" and types[-1] == "session.ended"
    assert events[0].warning and "tiny-random" in events[0].warning
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    turns = [e for e in events if e.type == "turn.committed"]
    done = [e for e in events if e.type == "response.done"]
    assert len(turns) == 2 and all(t.mode == "chat" and t.instruction is None for t in turns)
    assert [d.turn_id for d in done] == [t.turn_id for t in turns]
    for d in done:  # the deltas of a turn add up to its final text
        deltas = "".join(e.text for e in events if e.type == "response.delta" and e.turn_id == d.turn_id)
        assert deltas == d.text and 0 < d.tokens <= 6 and "first_token" in d.timings
    for (start, end), turn in zip(speech_two.segments, turns):
        assert abs(turn.start - start) <= 0.3 and abs(turn.end - end) <= 0.3


@pytest.mark.slow
def test_instruction_puts_turns_in_analysis_mode_and_transcript_is_readable(speech_two):
    proc = voice_agent("run", "--model", "tiny-random", "--max-new-tokens", "4", "--jsonl",
                       "--instruction", "What is the speaker's emotion?", str(speech_two.path))
    assert proc.returncode == 0, proc.stderr
    turns = [json.loads(line) for line in proc.stdout.splitlines() if '"turn.committed"' in line]
    assert len(turns) == 2
    assert all(t["mode"] == "analysis" and t["instruction"] == "What is the speaker's emotion?" for t in turns)

    proc = voice_agent("run", "--model", "tiny-random", "--max-new-tokens", "4", str(speech_two.path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum("user turn (chat)" in line for line in lines) == 2
    assert sum("agent:" in line for line in lines) == 2
    assert any("tiny-random" in line for line in lines)  # the loud warning


def test_run_speaks_each_answer_into_a_wav(tmp_path, speech_two):
    import wave

    out = tmp_path / "spoken"
    proc = voice_agent("run", "--model", "tiny-random", "--max-new-tokens", "12", "--jsonl", "--tts", "espeak",
                       "--speak-dir", str(out), str(speech_two.path))
    assert proc.returncode == 0, proc.stderr
    events = [parse_event(line) for line in proc.stdout.splitlines()]
    done = [e for e in events if e.type == "response.done"]
    spoken = [e for e in events if e.type == "response.audio.done"]
    assert len(done) == 2 and [s.turn_id for s in spoken] == [d.turn_id for d in done]
    errors = {e.turn_id: e.code for e in events if e.type == "error"}
    assert any(s.duration_s > 0 for s in spoken)
    texts = {d.turn_id: d.text for d in done}
    for s in spoken:
        # tiny-random writes gibberish: a piece espeak cannot say is an error event; an answer
        # with no letter or digit at all (only punctuation) has nothing to say and no error.
        nothing_to_say = not any(c.isalnum() for c in texts[s.turn_id])
        assert not s.interrupted
        assert s.duration_s > 0 or errors.get(s.turn_id) == "tts_unspeakable" or nothing_to_say
        with wave.open(str(out / f"{s.turn_id}.wav")) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
            assert abs(w.getnframes() / w.getframerate() - s.duration_s) < 0.05


def test_speak_dir_without_a_tts_engine_is_a_clear_error(tmp_path, speech_two):
    proc = voice_agent("run", "--speak-dir", str(tmp_path), str(speech_two.path))
    assert proc.returncode == 2 and "--speak-dir needs a TTS engine" in proc.stderr
