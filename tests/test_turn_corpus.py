"""The real-speech corpus for turn-taking (agent/bench/corpus.py), the policy's features
(agent/eot/policy.py) and `bench turns` on a recording with marks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.bench import corpus
from agent.eot import policy

SR = 16000


def test_transcripts_become_sentences_and_aligner_words() -> None:
    text = "That agent is already logged on.  Please enter your agent number followed by the pound key."
    assert corpus.sentences_of(text) == ["That agent is already logged on.",
                                         "Please enter your agent number followed by the pound key."]
    assert corpus.sentences_of("At the sound of the tone, the time will be exactly... now.") == [
        "At the sound of the tone, the time will be exactly... now."]
    assert corpus.words_of("Call-Forward on No Answer.") == ["call", "forward", "on", "no", "answer"]
    assert corpus.words_of("Press 1 to mute") is None and corpus.words_of("[beep tone]") is None
    assert corpus.split_of("agent-alreadyon") == corpus.split_of("agent-alreadyon")  # fixed, by prompt


def _sentence() -> corpus.Sentence:
    words = [corpus.Word(w, 0.2 + 0.4 * i, 0.55 + 0.4 * i) for i, w in enumerate("please enter your number".split())]
    rng = np.random.default_rng(0)
    audio = (0.001 * rng.standard_normal(int(2.0 * SR))).astype(np.float32)
    return corpus.Sentence("p", 0, "Please enter your number.", words, audio, 0.0)


def test_a_sentence_gives_a_finished_turn_and_cuts_at_its_middle_word_boundary() -> None:
    finished, *paused = corpus.cases([_sentence()], pauses=(0.3, 0.8))
    assert finished.kind == "statement" and finished.parts == [pytest.approx((0.2, 1.75))]
    assert finished.audio.size == round(1.75 * SR)
    assert [c.kind for c in paused] == ["mid_sentence", "mid_sentence"]
    short, long = paused
    # cut after "enter" (ends 0.95 s), "your" (starts 1.0 s) follows the pause
    assert short.parts[0] == pytest.approx((0.2, 0.95)) and short.parts[1][0] == pytest.approx(0.95 + 0.3)
    assert long.parts[1][0] - long.parts[0][1] == pytest.approx(0.8)
    assert long.audio.size == round(0.95 * SR) + round(0.8 * SR) + round(0.75 * SR)
    gap = long.audio[round(0.95 * SR) : round(1.75 * SR)]
    assert 0 < np.abs(gap).max() < 0.01  # the recording's own background, not digital silence
    assert "enter … your" in long.text and long.split == finished.split


def test_split_sentences_puts_each_sentence_between_the_gaps_around_it() -> None:
    words = [corpus.Word(w, a, b) for w, a, b in [("thank", 0.1, 0.3), ("you", 0.3, 0.5), ("call", 1.1, 1.3),
                                                    ("again", 1.3, 1.6), ("soon", 1.6, 1.9)]]
    audio = np.zeros(int(2.2 * SR), np.float32)
    first, second = corpus.split_sentences("p", "Thank you. Call again soon?", words, audio)
    assert first.offset == 0.0 and first.audio.size == round(0.8 * SR)  # to the middle of the 0.6 s gap
    assert second.offset == pytest.approx(0.8) and second.words[0].start == pytest.approx(0.3)
    assert second.kind == "question" and first.kind == "statement"


def test_prosodic_features_hear_a_falling_and_a_level_ending() -> None:
    t = np.arange(int(1.5 * SR)) / SR

    def voice(f0_end: float) -> np.ndarray:
        f0 = np.where(t < 1.0, 200.0, 200.0 + (f0_end - 200.0) * (t - 1.0) / 0.5)
        return (0.3 * np.sin(2 * np.pi * np.cumsum(f0) / SR)).astype(np.float32)

    falling, level = policy.features(voice(140.0), 0.5), policy.features(voice(200.0), 0.5)
    assert falling.pitch_end_st < -3 and abs(level.pitch_end_st) < 1
    assert falling.talk_s == pytest.approx(1.5)
    assert 0 < policy.combine(falling) < 1
    padded = policy.window(voice(200.0), 0.2)
    assert padded.size == t.size + round(0.2 * SR)


def test_bench_turns_on_a_recording_reports_finished_and_paused_turns(make_speech_fixture, tmp_path, capsys) -> None:
    from agent.bench.turns import main

    speech = make_speech_fixture([0.5, "turn on the kitchen light", 2.5, "set a timer for", 0.8, "ten minutes", 2.5],
                                 "bench-turns-marks")
    (a, b), (c, d), (e, f) = speech.segments
    marks = tmp_path / "marks.txt"
    marks.write_text(f"{a} {b} complete\n{c} {d} pause\n{e} {f} complete\n")
    code = main(["--wav", str(speech.path), "--marks", str(marks), "--detector", "silence", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["utterances"] == {"complete": 1, "pause": 1}
    fixed = result["rules"]["fixed 0.5 s"]
    assert fixed["premature_by_kind"] == {"complete": "0/1", "pause": "1/1"}  # 0.8 s > 0.5 s: cut
    assert 0.5 <= fixed["mean_wait_complete_s"] < 0.7  # the finished turn's wait, not null
    assert code == 1 and result["targets"] == {"premature_le_fixed": True, "mean_wait_le_0.35s": False,
                                               "waited_max_le_5pct": True}


def test_the_default_policy_waits_through_bench_latencys_um(make_speech_fixture, monkeypatch) -> None:
    """`bench latency`'s hesitant utterance, through the turn state machine as a session runs it
    with the default end-of-turn policy: one turn, not cut after "um"."""
    from agent.bench.turns import Utterance, run, vad_probs
    from agent.config import load_settings
    from agent.eot import detector_factory

    monkeypatch.delenv("VOICE_AGENT_TURNS__END_OF_TURN", raising=False)  # the shipped default (conftest pins the rule)
    settings = load_settings(None)
    assert settings.turns.end_of_turn == "smart-turn-prosody"
    speech = make_speech_fixture([0.5, "set a timer for, um,", 0.7, "ten minutes", 2.5], "latency-um")
    utterance = Utterance("filler", "", speech.samples, speech.segments)
    (probs,) = vad_probs([utterance])
    model = detector_factory(settings.turns.end_of_turn)()
    commits, _ = run(0, utterance, probs, settings.turns.to_turn_config(),
                     lambda i, t, audio: (float(model.predict([audio])[0]), 0.0))
    assert len(commits) == 1 and commits[0] > speech.segments[-1][1], (commits, speech.segments)


def test_the_calibration_fits_a_separable_cue_and_ranks_by_auc() -> None:
    from agent.bench.turns_calibrate import auc, fit_logistic

    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.5
    x = np.stack([np.where(y, 1.0, -1.0) + 0.5 * rng.standard_normal(400), rng.standard_normal(400)], axis=1)
    w = fit_logistic(x, y.astype(np.float64))
    assert w[1] > 1 and abs(w[2]) < 0.5  # the informative cue gets the weight, the noise does not
    assert auc(x[:, 0], y) > 0.95 and 0.4 < auc(x[:, 1], y) < 0.6 and auc(-x[:, 0], y) < 0.05


@pytest.mark.slow
def test_the_corpus_builds_from_the_debian_packages() -> None:
    """Fetched with apt-get download into the corpus cache (once), aligned by pocketsphinx."""
    import shutil

    if shutil.which("apt-get") is None:
        pytest.skip("the real-speech corpus needs apt-get and dpkg")
    sentences = corpus.sentences()
    assert len(sentences) >= 200
    assert {s.split for s in sentences} == {"calibrate", "held_out"}
    assert "CC-BY-SA-3.0" in (corpus.fetch() / ".done").read_text()
    for s in sentences:
        assert [w.text for w in s.words] == corpus.words_of(s.text)
        assert all(-1e-6 <= a < b <= s.audio.size / SR + 0.05 for a, b in ((w.start, w.end) for w in s.words)), s
