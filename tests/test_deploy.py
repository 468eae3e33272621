"""Deployment files: docker-compose.yml, Dockerfile, .dockerignore and deploy/ are checked with
the real tools where they exist here (`docker-compose config`, our own CLI parser, config loader,
plugin configs and HTTP app), since no Docker engine runs on this machine.

`docker-compose config` reads files only: no engine, no network.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from agent.cli import build_parser, load_cli_settings
from agent.config import load_settings
from agent.plugin import Plugin, _load_class

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
AGENT_YAML = ROOT / "deploy" / "agent.yaml"
LIVEKIT_YAML = ROOT / "deploy" / "livekit" / "livekit.yaml"
MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
AGENT_SERVICES = ("agent", "agent-vllm")  # services that run our image
GPU_SERVICES = ("agent", "vllm")

# ---------------------------------------------------------------------------------------------
# docker-compose


def compose_bin() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip("docker-compose is not installed (`make system-packages` installs it; CI has it)")
    return path


def compose(*args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess[str]:
    # A clean environment: no DOCKER_HOST / COMPOSE_* of the caller, defaults for ${VAR:-x}.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([compose_bin(), "-f", str(file), "--project-directory", str(ROOT), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors merged, paths absolute)."""
    result = compose("--profile", "vllm", "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_config_is_valid() -> None:
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warnings either


def test_compose_config_is_valid_with_the_vllm_profile() -> None:
    result = compose("--profile", "vllm", "config", "-q")
    assert result.returncode == 0, result.stderr
    services = compose("--profile", "vllm", "config", "--services").stdout.split()
    assert {"agent", "mosquitto", "homeassistant", "livekit", "vllm", "agent-vllm"} <= set(services)


def _break_unknown_key(doc: dict[str, Any]) -> None:
    doc["services"]["agent"]["portz"] = ["8080:8080"]


def _break_dependency(doc: dict[str, Any]) -> None:
    doc["services"]["agent"]["depends_on"] = {"mosquito": {"condition": "service_healthy"}}


def _break_gpu_capabilities(doc: dict[str, Any]) -> None:
    doc["services"]["agent"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"


def _break_healthcheck(doc: dict[str, Any]) -> None:
    doc["services"]["mosquitto"]["healthcheck"]["retries"] = "many"


@pytest.mark.parametrize("breakage", [_break_unknown_key, _break_dependency, _break_gpu_capabilities,
                                      _break_healthcheck])
def test_a_broken_compose_file_fails_config(breakage: Any, tmp_path: Path) -> None:
    """The guard itself: `config -q` rejects our file with one mistake put in."""
    doc = yaml.safe_load(COMPOSE.read_text())
    breakage(doc)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    result = compose("--profile", "vllm", "config", "-q", file=broken)
    assert result.returncode != 0, f"{breakage.__name__} was accepted"


def test_gpu_services_reserve_a_gpu(resolved: dict[str, Any]) -> None:
    for name in GPU_SERVICES:
        devices = resolved["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
    assert "deploy" not in resolved["services"]["agent-vllm"]  # inference runs in vllm


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path → host source of the service's bind mounts and volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
        out[target] = source
    return out


def _published(service: dict[str, Any]) -> set[tuple[int, str]]:
    ports = set()
    for p in service.get("ports", []):
        target = str(p["target"])
        lo, _, hi = target.partition("-")
        ports |= {(n, p.get("protocol", "tcp")) for n in range(int(lo), int(hi or lo) + 1)}
    return ports


def agent_args(service: dict[str, Any]) -> Any:
    return build_parser().parse_args([str(a) for a in service["command"]])


@pytest.mark.parametrize("name", AGENT_SERVICES)
def test_agent_service_command_parses_and_loads(name: str, resolved: dict[str, Any]) -> None:
    service = resolved["services"][name]
    assert Path(service["build"]["context"]) == ROOT
    args = agent_args(service)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert (args.port, "tcp") in _published(service)
    # The --config file is the mounted deploy/agent.yaml; flags + file load as `serve` would.
    assert Path(_mounts(service)[args.config]) == AGENT_YAML
    args.config = str(AGENT_YAML)
    settings = load_cli_settings(args)
    assert settings.server.port == args.port
    # The compose healthcheck probes the port that `serve` listens on.
    assert f"127.0.0.1:{args.port}/healthz" in " ".join(service["healthcheck"]["test"])
    assert "mosquitto" in service["depends_on"]
    assert _mounts(service)["/cache"] == "hf-cache"


def test_agent_vllm_talks_to_the_vllm_service(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    settings = load_cli_settings(_with_local_config(agent_args(services["agent-vllm"])))
    assert settings.backend == "openai"
    url = urlsplit(settings.openai_url)
    assert url.hostname == "vllm" and url.path == "/v1"
    vllm = services["vllm"]
    assert services["agent-vllm"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert f":{url.port}/health" in " ".join(vllm["healthcheck"]["test"])  # vLLM listens on 8000
    cmd = [str(a) for a in vllm["command"]]
    assert cmd[cmd.index("--model") + 1] == "Qwen/Qwen2-Audio-7B-Instruct"
    assert settings.openai_model is None  # the agent asks for the one model vLLM serves
    assert json.loads(cmd[cmd.index("--limit-mm-per-prompt") + 1]) == {"audio": 5}
    assert "--enable-prefix-caching" in cmd
    assert vllm["profiles"] == services["agent-vllm"]["profiles"] == ["vllm"]


def _with_local_config(args: Any) -> Any:
    args.config = str(AGENT_YAML)
    return args


def test_mqtt_plugin_points_at_the_mosquitto_service(resolved: dict[str, Any]) -> None:
    mosquitto = resolved["services"]["mosquitto"]
    assert Path(_mounts(mosquitto)["/mosquitto/config/mosquitto.conf"]) == MOSQUITTO_CONF
    listeners = [int(line.split()[1]) for line in MOSQUITTO_CONF.read_text().splitlines()
                 if line.startswith("listener ")]
    mqtt = load_settings(AGENT_YAML).plugins["mqtt"]
    assert mqtt["host"] == "mosquitto" and mqtt["port"] in listeners
    assert any(str(mqtt["port"]) in arg for arg in mosquitto["healthcheck"]["test"])


def test_livekit_block_matches_the_livekit_service(resolved: dict[str, Any]) -> None:
    service = resolved["services"]["livekit"]
    assert "--dev" in service["command"]
    assert Path(_mounts(service)["/etc/livekit.yaml"]) == LIVEKIT_YAML
    server = yaml.safe_load(LIVEKIT_YAML.read_text())
    block = load_settings(AGENT_YAML).plugins["livekit"]
    assert block == {**block, "url": "ws://livekit:7880", "api_key": "devkey", "api_secret": "secret",
                     "room": "voice-agent"}
    assert server["keys"][block["api_key"]] == block["api_secret"]
    url = urlsplit(block["url"])
    assert url.hostname == "livekit" and url.port == server["port"]
    published = _published(service)
    rtc = server["rtc"]
    assert {(server["port"], "tcp"), (rtc["tcp_port"], "tcp")} <= published
    assert {(p, "udp") for p in range(rtc["port_range_start"], rtc["port_range_end"] + 1)} <= published


# ---------------------------------------------------------------------------------------------
# deploy/agent.yaml with our own loader and plugin configs


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, value in dockerfile():
        if keyword == "ENV":
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                env[key] = val
    return env


def test_agent_yaml_loads_in_the_container_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's ENV (VOICE_AGENT_CACHE, …) must not trip the VOICE_AGENT_* settings."""
    for key in list(os.environ):
        if key.startswith("VOICE_AGENT_"):
            monkeypatch.delenv(key)
    for key, value in _dockerfile_env().items():
        monkeypatch.setenv(key, value)
    settings = load_settings(AGENT_YAML)
    assert settings.model == "Qwen/Qwen2-Audio-7B-Instruct"
    assert set(settings.plugins) >= {"mqtt", "livekit"}


def commented_block(text: str, name: str) -> dict[str, Any]:
    """A plugin block shipped commented out (`  # name:` and the `  #   …` lines under it)."""
    lines = text.splitlines()
    start = lines.index(f"  # {name}:")
    body = [f"{name}:"]
    for line in lines[start + 1:]:
        if not line.startswith("  #   "):
            break
        body.append(line[len("  # "):])
    return yaml.safe_load("\n".join(body))[name]


def plugin_configs() -> list[tuple[str, Any]]:
    text = AGENT_YAML.read_text()
    configs = list(load_settings(AGENT_YAML).plugins.items())
    configs.append(("homeassistant", commented_block(text, "homeassistant")))  # documented, off
    return configs


@pytest.mark.parametrize(("name", "raw"), plugin_configs(), ids=[n for n, _ in plugin_configs()])
def test_agent_yaml_plugin_config_is_valid(name: str, raw: Any) -> None:
    """Each configured plugin's config validates as PluginHost.from_config validates it."""
    try:
        cls = _load_class(name, None)
    except ValueError as exc:
        if name == "livekit" and ("unknown plugin" in str(exc) or "cannot be loaded" in str(exc)):
            pytest.skip(f"the livekit plugin is not importable yet ({exc}); its block is checked "
                        "against the compose file only")
        raise
    assert issubclass(cls, Plugin)
    cls.Config.model_validate(dict(raw or {}))


def test_plugin_validation_can_fail() -> None:
    with pytest.raises(Exception):
        _load_class("mqtt", None).Config.model_validate({"host": "mosquitto", "prot": 1883})


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line ends the Dockerfile"
    return out


def instructions(keyword: str) -> list[str]:
    return [value for kw, value in dockerfile() if kw == keyword]


def exec_form(value: str) -> list[str]:
    form = json.loads(value)
    assert isinstance(form, list) and all(isinstance(a, str) for a in form), value
    return form


def image_command() -> list[str]:
    (entrypoint,) = instructions("ENTRYPOINT")[-1:]
    (cmd,) = instructions("CMD")[-1:]
    return exec_form(entrypoint) + exec_form(cmd)


def test_dockerfile_command_parses_with_our_cli() -> None:
    argv = image_command()
    assert argv[0] == "voice-agent"  # the console script of pyproject.toml
    assert "voice-agent" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert str(args.port) in instructions("EXPOSE")[-1].split()
    # The default config is copied into the image at the path CMD names, and it loads.
    copies = {shlex.split(v)[-1]: shlex.split(v)[:-1] for v in instructions("COPY")}
    assert copies[args.config] == ["deploy/agent.yaml"]
    assert load_cli_settings(_with_local_config(args)).server.port == args.port


def test_compose_agent_commands_are_the_image_command(resolved: dict[str, Any]) -> None:
    image_args = image_command()[1:]
    assert [str(a) for a in resolved["services"]["agent"]["command"]] == image_args
    vllm_cmd = [str(a) for a in resolved["services"]["agent-vllm"]["command"]]
    assert vllm_cmd[:len(image_args)] == image_args


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = instructions("USER")
    assert users, "no USER instruction: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(v for v in instructions("RUN") if "useradd" in v)
    assert re.search(rf"useradd\b.*\s{re.escape(user)}(\s|$)", created), f"user {user!r} is never created"
    # USER comes before the command runs, i.e. after the last RUN (which needs root for pip).
    order = [kw for kw, _ in dockerfile()]
    assert max(i for i, kw in enumerate(order) if kw == "USER") > max(i for i, kw in enumerate(order) if kw == "RUN")


def test_dockerfile_installs_the_extras_and_the_pinned_torch() -> None:
    args = {k: v for k, _, v in (a.partition("=") for a in instructions("ARG"))}
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert {"server", "mqtt", "homeassistant", "webhook", "livekit"} <= set(args["EXTRAS"].split(",")) <= extras
    make_torch = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert make_torch and args["TORCH_VERSION"] == make_torch.group(1)
    env = _dockerfile_env()
    assert env["HF_HOME"].startswith("/cache/") and env["VOICE_AGENT_CACHE"].startswith("/cache/")
    assert "/cache" in json.loads(instructions("VOLUME")[-1])


def healthcheck_probe() -> tuple[list[str], str]:
    (value,) = instructions("HEALTHCHECK")[-1:]
    cmd = exec_form(value[value.index("CMD") + len("CMD"):].strip())
    url = re.search(r"https?://[^'\"\s]+", " ".join(cmd))
    assert url, cmd
    return cmd, url.group(0)


def test_healthcheck_targets_the_served_health_route() -> None:
    cmd, url = healthcheck_probe()
    parts = urlsplit(url)
    args = build_parser().parse_args(image_command()[1:])
    assert parts.hostname in ("127.0.0.1", "localhost") and parts.port == args.port
    assert parts.path == "/healthz"
    assert cmd[0] == "python"  # curl is not in python:*-slim; python is


async def test_healthcheck_probe_passes_against_the_real_app(unused_port: int) -> None:
    """Run the Dockerfile's probe, as is, against our app (with a bearer token set: /healthz
    must stay public), then with no inference worker (the readiness route answers 503: it must
    fail), then against a closed port (it must fail)."""
    from aiohttp import web

    from agent.inference.scripted import ScriptedBackend
    from agent.runtime import AgentRuntime
    from agent.server.app import create_app

    cmd, url = healthcheck_probe()
    port = urlsplit(url).port
    settings = load_settings(None, model="tiny-random")
    settings.server.token = "secret-token"
    backend = ScriptedBackend([], default="ok")
    runtime = AgentRuntime(settings, backend=backend)
    runner = web.AppRunner(create_app(runtime, settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    live = runner.addresses[0][1]
    try:
        probe = [sys.executable if a == "python" else a.replace(f":{port}/", f":{live}/") for a in cmd]
        assert await _run(probe) == 0
        backend.healthy = False  # type: ignore[attr-defined]  # as the pool while no worker is up
        assert await _run(probe) != 0
        closed = [a.replace(f":{live}/", f":{unused_port}/") for a in probe]
        assert await _run(closed) != 0
    finally:
        await runner.cleanup()


async def _run(cmd: list[str]) -> int:
    import asyncio

    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# .dockerignore and the Makefile


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            candidate = "/".join(parts[:i])
            if fnmatch(candidate, pattern) or (pattern.startswith("**/") and
                                               any(fnmatch("/".join(parts[j:i]), pattern[3:]) for j in range(i))):
                excluded = not negate
                break
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    for value in instructions("COPY"):
        for source in shlex.split(value)[:-1]:
            target = ROOT / source
            assert target.exists(), source
            files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()
                                                       and "__pycache__" not in p.parts]
            for file in files:
                assert not dockerignored(file.relative_to(ROOT).as_posix()), f"{file} is excluded from the build"
    for static in (ROOT / "agent" / "server" / "static").glob("*"):
        assert not dockerignored(static.relative_to(ROOT).as_posix())
    for junk in (".git/config", "tests/test_deploy.py", "agent/__pycache__/cli.cpython-311.pyc", "docker-compose.yml"):
        assert dockerignored(junk), junk


def test_makefile_installs_docker_compose() -> None:
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("APT_PACKAGES"))
    assert "docker-compose" in line.split("=", 1)[1].split()
