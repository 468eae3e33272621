"""The generated docs (issue 27, item 4): `python -m agent.docs` writes docs/configuration.md from
the settings models, docs/events.md from the event schema and the generated blocks of
docs/benchmarks.md from the saved results; a committed file that differs from that is stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import docs
from agent.config import Settings
from agent.events import json_schema

ROOT = Path(__file__).resolve().parent.parent


def test_no_generated_doc_is_stale() -> None:
    assert [str(p.relative_to(ROOT)) for p in docs.stale()] == [], "run `python -m agent.docs` and commit"


def test_every_setting_and_every_event_is_in_the_docs() -> None:
    config = docs.configuration_md()
    for name in Settings.model_fields:
        assert f"| `{name}` | `VOICE_AGENT_{name.upper()}` |" in config, name
    assert "| `turns.min_silence_s` | `VOICE_AGENT_TURNS__MIN_SILENCE_S` | float | `0.5` | ≥ 0.1, ≤ 5 |" in config
    events = docs.events_md()
    for group in json_schema().values():
        for kind in group["discriminator"]["mapping"]:
            assert f"### `{kind}`" in events, kind


def test_a_changed_setting_makes_the_committed_file_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for path, text in docs.expected():
        if not path.is_relative_to(docs.DOCS):
            continue  # the README: read where it is
        target = tmp_path / path.relative_to(docs.DOCS)
        target.write_text(text)
    monkeypatch.setattr(docs, "DOCS", tmp_path)
    assert docs.stale() == []
    monkeypatch.setattr(docs, "configuration_md", lambda: "something else\n")
    assert docs.stale() == [tmp_path / "configuration.md"]
    assert docs.main(["--check"]) == 1


def test_a_generated_block_is_what_its_command_prints() -> None:
    pages = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "turn-taking.md"]
    for page in pages:
        blocks = docs.GENERATED.findall(page.read_text())
        assert blocks, f"{page.name} has no generated block"
        for _, command, body, _ in blocks:
            # a saved result's table (bench-results/), or the code's own metadata: never a new run
            assert re.fullmatch(r"voice-agent (bench \w+ (--markdown|--table|--from-json|--hops-markdown)"
                                r"( bench-results/\S+\.json)+|model families)", command), command
            assert body == docs.run_command(command).rstrip("\n") + "\n"


def test_field_comments_are_read_from_the_source() -> None:
    from agent.config import TurnSettings

    comments = docs.field_comments(TurnSettings)
    assert comments["complete_threshold"].startswith("The default policy's, from `voice-agent bench turns")
    assert comments["complete_threshold"].endswith("P(complete) ≥ this: complete")  # the line's own comment last
    assert comments["interrupt_min_speech_s"].startswith("Speech while the agent speaks interrupts it")
