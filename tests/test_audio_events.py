"""Audio conversion and the typed event schema."""

import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from agent import events as ev
from agent.audio import AudioFileError, Resampler, frame_from_pcm, read_file, to_mono16k


@pytest.mark.parametrize(
    "sox_args",
    [["-r", "44100", "-c", "2", "-b", "8"],  # wrong rate, stereo, 8-bit
     ["-r", "48000", "-c", "1", "-e", "floating-point", "-b", "32"],  # float
     ["-r", "8000", "-c", "2", "-b", "16"]],
    ids=["44k-stereo-u8", "48k-float", "8k-stereo"],
)
def test_any_wav_format_is_converted(speech_two, tmp_path, sox_args):
    out = tmp_path / "converted.wav"
    subprocess.run(["sox", str(speech_two.path), *sox_args, str(out)], check=True)
    audio = read_file(out)
    assert audio.dtype == np.float32
    assert abs(audio.size - speech_two.samples.size) < 160  # same duration at 16 kHz
    n = min(audio.size, speech_two.samples.size)
    if "8000" not in sox_args:  # 8 kHz loses the high band: only the duration is comparable
        assert np.corrcoef(audio[:n], speech_two.samples[:n])[0, 1] > 0.99


def test_compressed_container_is_read(speech_two, tmp_path):
    out = tmp_path / "speech.flac"
    subprocess.run(["sox", str(speech_two.path), str(out)], check=True)
    np.testing.assert_allclose(read_file(out), speech_two.samples, atol=1e-4)


def test_pcm_frames_of_any_layout_convert():
    t = np.arange(48000) / 48000
    tone = (np.sin(2 * np.pi * 440 * t) * 20000).astype(np.int16)
    stereo = np.stack([tone, tone], axis=1).reshape(-1)  # interleaved s16, as WebRTC delivers
    out = to_mono16k(stereo, 48000, "stereo")
    assert abs(out.size - 16000) <= 32
    assert 0.55 < np.abs(out).max() < 0.65  # 20000/32767, not doubled by the downmix
    # Streaming: frame by frame gives the same result as the whole buffer.
    r = Resampler()
    parts = [r.convert(frame_from_pcm(stereo[i:i + 1920], 48000, "stereo")) for i in range(0, stereo.size, 1920)]
    streamed = np.concatenate(parts + [r.convert(None)])
    np.testing.assert_allclose(streamed, out, atol=1e-6)


def test_bad_files_raise_naming_the_file(tmp_path, speech_two):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_bytes(b"this is not audio at all " * 20)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(speech_two.path.read_bytes()[: speech_two.path.stat().st_size // 2])
    for path, reason in [(tmp_path / "missing.wav", "no such file"), (empty, "empty"),
                         (text, "cannot decode"), (cut, "truncated")]:
        with pytest.raises(AudioFileError, match=reason) as info:
            read_file(path)
        assert str(path) in str(info.value)


def test_events_round_trip_through_json():
    samples = [
        ev.SessionStarted(session_id="s", seq=1, model="tiny-random"),
        ev.TurnCommitted(session_id="s", seq=2, turn_id="t1", start=1.0, end=2.5, mode="analysis",
                         instruction="what emotion?"),
        ev.ResponseDone(session_id="s", seq=3, turn_id="t1", text="hi", tokens=2, timings={"total": 0.1}),
        ev.ToolCall(session_id="s", seq=4, turn_id="t1", call_id="c1", name="light", arguments={"on": True}),
        ev.Error(session_id="s", seq=5, code="busy", message="queue full"),
    ]
    for event in samples:
        again = ev.parse_event(event.model_dump_json())
        assert again == event and type(again) is type(event)


def test_commands_validate_with_reasons():
    assert isinstance(ev.parse_command('{"type": "instruction.set", "text": "transcribe"}'), ev.InstructionSet)
    with pytest.raises(ValidationError, match="type"):
        ev.parse_command('{"type": "self.destruct"}')
    with pytest.raises(ValidationError):
        ev.parse_command('{"type": "session.update", "max_new_tokens": -4}')
    with pytest.raises(ValidationError):
        ev.parse_command(b"not json")


def test_stamper_numbers_events_per_session():
    a, b = ev.EventStamper("a"), ev.EventStamper("b")
    seqs = [a.stamp(ev.SpeechStarted(t=0)).seq, a.stamp(ev.SpeechStopped(t=1)).seq, b.stamp(ev.SpeechStarted(t=0)).seq]
    assert seqs == [1, 2, 1]


def test_schema_command_prints_every_event_type():
    out = subprocess.run([sys.executable, "-m", "agent.cli", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    text = json.dumps(schema)
    for name in ["session.started", "turn.committed", "response.delta", "tool.call", "error",
                 "instruction.set", "session.close"]:
        assert f'"{name}"' in text
