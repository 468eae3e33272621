"""Configuration refuses what it does not understand, and says where (issue 15, items 2, 3, 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("VOICE_AGENT_") and key != "VOICE_AGENT_CACHE":
            monkeypatch.delenv(key)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("section, expected", [
    ({"turns": {"min_silence": 0.4}}, "turns.min_silence: unknown key (did you mean min_silence_s?)"),
    ({"server": {"prot": 9000}}, "server.prot: unknown key (did you mean port?)"),
    ({"workres": 2}, "workres: unknown key (did you mean workers?)"),
])
def test_misspelled_keys_in_every_section_are_errors(tmp_path: Path, section: dict, expected: str) -> None:
    import yaml

    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(section))
    assert expected in error_of(path)
    assert expected in error_of(None, **section)  # the same for keyword settings (Agent(...))


def test_unknown_environment_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICE_AGENT_WORKRES", "2")
    monkeypatch.setenv("VOICE_AGENT_TURNS__MIN_SILENCE", "0.4")
    message = error_of(None)
    assert "VOICE_AGENT_WORKRES (did you mean VOICE_AGENT_WORKERS?)" in message
    assert "VOICE_AGENT_TURNS__MIN_SILENCE (did you mean VOICE_AGENT_TURNS__MIN_SILENCE_S?)" in message
    # the right names work, and so do our variables that are not settings
    monkeypatch.delenv("VOICE_AGENT_WORKRES")
    monkeypatch.delenv("VOICE_AGENT_TURNS__MIN_SILENCE")
    monkeypatch.setenv("VOICE_AGENT_TURNS__MIN_SILENCE_S", "0.4")
    monkeypatch.setenv("VOICE_AGENT_WORKERS", "2")
    monkeypatch.setenv("VOICE_AGENT_CACHE", "/tmp/cache")
    monkeypatch.setenv("VOICE_AGENT_PLUGINS__MQTT__HOST", "broker")  # plugin configs check their own keys
    settings = load_settings(None)
    assert settings.turns.min_silence_s == 0.4 and settings.workers == 2
    assert settings.plugins == {"mqtt": {"host": "broker"}}


@pytest.mark.parametrize("key, value", [("max_new_tokens", True), ("workers", False),
                                        ("server", {"port": True}), ("turns", {"min_silence_s": True})])
def test_booleans_are_not_numbers(key: str, value: object) -> None:
    assert "expected a number, not a boolean" in error_of(None, **{key: value})


def test_numbers_from_the_environment_still_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICE_AGENT_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("VOICE_AGENT_SERVER__PORT", "9000")
    settings = load_settings(None)
    assert settings.max_new_tokens == 64 and settings.server.port == 9000


@pytest.mark.parametrize("value, reason", [("/nonexistent", "no such directory"), ("./dir", "no such directory"),
                                           ("models/qwen/v1", "no such directory")])
def test_a_model_that_looks_like_a_path_must_be_a_directory(value: str, reason: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = error_of(None, model=value)
    assert f"{value}: {reason}" in message and "Repo id" not in message
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "./weights.bin: not a directory" in error_of(None, model="./weights.bin")
    (tmp_path / "dir").mkdir()
    assert load_settings(None, model="./dir").model == "./dir"
    assert load_settings(None, model="Qwen/Qwen2-Audio-7B-Instruct").model == "Qwen/Qwen2-Audio-7B-Instruct"


def test_yaml_errors_name_the_file_and_line_once(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("model: tiny-random\nturns:\n  a: [1\n")
    message = error_of(path)
    assert message.startswith(f"{path}, line 4, column 1: ")
    assert message.count("line") == 1 and "<unicode string>" not in message and "^" not in message


def test_a_missing_or_unreadable_config_says_so_once(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"{missing}: no such file or directory"
    assert error_of(tmp_path) == f"{tmp_path}: is a directory"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"system_prompt: caf\xe9\n")
    assert error_of(latin1) == f"{latin1}: not UTF-8 text"


def test_scripted_backend_needs_a_valid_script(tmp_path: Path) -> None:
    assert "needs a script file (--script FILE.yaml" in error_of(None, backend="scripted")
    assert "no such file" in error_of(None, backend="scripted", script=str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("turns:\n  - {tool_call: {nmae: x}}\n")
    message = error_of(None, backend="scripted", script=str(bad))
    assert f"script {bad}" in message and "nmae: unknown key (did you mean name?)" in message
    good = tmp_path / "good.yaml"
    good.write_text("- hello\n")
    assert load_settings(None, backend="scripted", script=str(good)).script == str(good)
