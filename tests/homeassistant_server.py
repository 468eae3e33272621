"""A real Home Assistant for tests, on a free loopback port.

`install()` puts Home Assistant 2024.3.3 (the last release for Python 3.11; 2024.4 needs 3.12)
into a virtual environment of its own under tests/.ha-cache/ (it pins many packages; the
project's environment is not touched), once per machine. `HomeAssistant(workdir).start()`
writes a small config (template light and switch, generic_thermostat, no `default_config:`),
runs `hass --skip-pip`, and onboards a user through the HTTP API; `.url` and `.token` (a
long-lived access token) are then ready. Only the install reaches the network: every
requirement of the integrations loaded is installed up front, so hass never calls pip.

    with HomeAssistant(tmp_path).start() as ha:
        ha.state("light.kitchen")["state"]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from agent.bench.procs import stop_process
from tests.mosquitto import free_port

HA_VERSION = "2024.3.3"
CACHE = Path(__file__).parent / ".ha-cache"
# Requirements of the integrations hass loads here (frontend, onboarding → person → image_upload,
# analytics → recorder, backup, hardware, file_upload), which it would otherwise pip-install at start.
REQUIREMENTS = [f"homeassistant=={HA_VERSION}", "home-assistant-frontend==20240307.0", "Pillow==10.2.0",
                "SQLAlchemy==2.0.27", "fnv-hash-fast==0.5.0", "psutil-home-assistant==0.0.1",
                "securetar==2024.2.1", "janus==1.0.0"]
# What the wyoming integration pulls in (wyoming → assist_pipeline → conversation, stt, tts →
# ffmpeg, wake_word; its config flow imports the zeroconf component, so the library too — the
# zeroconf integration itself is not loaded: nothing is multicast), pinned as HA 2024.3.3's
# manifests pin them: `install(extras=WYOMING)`.
WYOMING = ["wyoming==1.5.3", "webrtc-noise-gain==1.2.3", "hassil==1.6.1", "home-assistant-intents==2024.3.12",
           "mutagen==1.47.0", "ha-ffmpeg==3.1.0", "zeroconf==0.131.0"]
# The set pip resolved for them on CPython 3.11 (Nov 2026), used as constraints: resolving from
# scratch takes pip ~80 s more, and later releases break this old HA (josepy 2 breaks acme,
# which hass_nabucasa imports on every HTTP request).
CONSTRAINTS = """
acme==2.8.0 aiohttp==3.9.3 aiohttp-cors==0.7.0 aiohttp-fast-url-dispatcher==0.3.0 aiohttp-zlib-ng==0.3.1
aiooui==0.1.11 aiosignal==1.4.0 anyio==4.16.0 astral==2.2 async-interrupt==1.1.1 async-timeout==5.0.1
atomicwrites-homeassistant==1.4.1 attrs==23.2.0 awesomeversion==24.2.0 bcrypt==4.1.2 bleak==3.1.0
bleak-retry-connector==4.7.1 bluetooth-adapters==2.4.0 bluetooth-auto-recovery==1.6.4
bluetooth-data-tools==1.28.4 boto3==1.44.8 botocore==1.44.8 btsocket==0.3.0 certifi==2026.10.19.post1
cffi==2.1.1 charset-normalizer==3.5.2 ciso8601==2.3.1 cryptography==42.0.5 dbus-fast==5.2.0 ecdsa==0.19.2
envs==1.4 fnv-hash-fast==0.5.0 fnvhash==0.1.0 frozenlist==1.8.0 greenlet==3.5.6 h11==0.16.0
habluetooth==6.1.0 hass-nabucasa==0.78.0 home-assistant-bluetooth==1.12.0
home-assistant-frontend==20240307.0 homeassistant==2024.3.3 httpcore==1.0.9 httpx==0.27.0 idna==3.20
ifaddr==0.2.0 janus==1.0.0 Jinja2==3.1.3 jmespath==1.1.0 josepy==1.15.0 lru-dict==1.3.0 MarkupSafe==3.0.4
multidict==6.9.1 orjson==3.9.15 packaging==26.3 pillow==10.2.0 psutil==7.2.2 psutil-home-assistant==0.0.1
pyasn1==0.6.5 pycognito==2023.5.0 pycparser==3.12 PyJWT==2.8.0 pyOpenSSL==24.0.0 pyRFC3339==2.1.1
PyRIC==0.1.6.3 python-dateutil==2.9.0.post0 python-jose==3.5.0 python-slugify==8.0.4 pytz==2026.6
PyYAML==6.0.1 requests==2.31.0 rsa==4.9.1 s3transfer==0.19.3 securetar==2024.2.1 six==1.17.0
sniffio==1.3.1 snitun==0.36.2 SQLAlchemy==2.0.27 text-unidecode==1.3 typing_extensions==4.16.0
uart-devices==0.1.1 ulid-transform==0.9.0 urllib3==1.26.20 usb-devices==0.5.1 voluptuous==0.13.1
voluptuous-serialize==2.6.0 yarl==1.9.4 zlib-ng==1.1.0
""".split()

# Template entities over input helpers: a dimmable light, a switch that heats, a thermostat.
CONFIG = """\
homeassistant:
  name: Test house
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: NL
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
websocket_api:
logger:
  default: warning
input_boolean:
  kitchen_power: {{name: Kitchen power}}
  heater_power: {{name: Heater power}}
input_number:
  kitchen_level: {{name: Kitchen level, min: 0, max: 255, step: 1}}
light:
  - platform: template
    lights:
      kitchen:
        friendly_name: Kitchen
        value_template: "{{{{ is_state('input_boolean.kitchen_power', 'on') }}}}"
        level_template: "{{{{ states('input_number.kitchen_level') | int }}}}"
        turn_on: {{service: input_boolean.turn_on, target: {{entity_id: input_boolean.kitchen_power}}}}
        turn_off: {{service: input_boolean.turn_off, target: {{entity_id: input_boolean.kitchen_power}}}}
        set_level:
          - {{service: input_number.set_value, target: {{entity_id: input_number.kitchen_level}},
             data: {{value: "{{{{ brightness }}}}"}}}}
          - {{service: input_boolean.turn_on, target: {{entity_id: input_boolean.kitchen_power}}}}
switch:
  - platform: template
    switches:
      heater:
        friendly_name: Heater
        value_template: "{{{{ is_state('input_boolean.heater_power', 'on') }}}}"
        turn_on: {{service: input_boolean.turn_on, target: {{entity_id: input_boolean.heater_power}}}}
        turn_off: {{service: input_boolean.turn_off, target: {{entity_id: input_boolean.heater_power}}}}
sensor:
  - platform: template
    sensors:
      hall_temperature:
        friendly_name: Hall temperature
        unit_of_measurement: "°C"
        device_class: temperature
        value_template: "18.5"
climate:
  - platform: generic_thermostat
    name: Hall
    heater: switch.heater
    target_sensor: sensor.hall_temperature
    target_temp: 19
    min_temp: 5
    max_temp: 30
    initial_hvac_mode: heat
"""


class InstallError(RuntimeError):
    pass


def pypi_reachable(timeout: float = 5.0) -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def install(cache: Path = CACHE, extras: Sequence[str] = ()) -> tuple[Path, float | None]:
    """The venv's directory, and the seconds the install took (None: it was already there).
    `extras`: more requirements (e.g. `WYOMING`) added to the same venv, once each set."""
    venv = cache / f"venv-{HA_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
    done = venv / ".installed"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time per machine
        started = time.monotonic()
        fresh = not done.exists()
        if fresh:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            _pip(venv, cache, REQUIREMENTS)
            done.write_text(HA_VERSION)
        extras_done = venv / f".extras-{hashlib.sha1(' '.join(sorted(extras)).encode()).hexdigest()[:12]}"
        if extras and not extras_done.exists():
            _pip(venv, cache, list(extras))
            extras_done.write_text("\n".join(extras))
            fresh = True
        return venv, (time.monotonic() - started) if fresh else None


def _pip(venv: Path, cache: Path, requirements: list[str]) -> None:
    constraints = cache / "constraints.txt"
    constraints.write_text("\n".join(CONSTRAINTS) + "\n")
    # --no-compile: hass compiles the few modules it imports on first start.
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-compile", "--disable-pip-version-check",
                          "-c", str(constraints), *requirements], capture_output=True, text=True)
    if pip.returncode != 0:
        raise InstallError(f"pip install {' '.join(requirements)} failed:\n"
                           f"{pip.stdout[-3000:]}{pip.stderr[-3000:]}")


class HomeAssistant:
    def __init__(self, workdir: Path, venv: Path | None = None, extra_config: str = "") -> None:
        """`extra_config`: YAML appended to the configuration (e.g. `intent:` for Assist)."""
        self.dir = Path(workdir)
        self.extra_config = extra_config
        self.config_dir = self.dir / "config"
        self.venv = venv
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = self.dir / "hass.out"

    # ---- REST, with the token -------------------------------------------------------------
    def request(self, method: str, path: str, data: Any = None, token: str | None = None) -> tuple[int, Any]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method,
                                     headers={"Authorization": f"Bearer {token or self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def state(self, entity_id: str) -> dict[str, Any]:
        status, data = self.request("GET", f"/api/states/{entity_id}")
        assert status == 200, (status, data)
        return data

    def call(self, domain: str, service: str, **data: Any) -> list[dict[str, Any]]:
        status, answer = self.request("POST", f"/api/services/{domain}/{service}", data)
        assert status == 200, (status, answer)
        return answer

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> HomeAssistant:
        if self.venv is None:
            self.venv, _ = install()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configuration.yaml").write_text(CONFIG.format(port=self.port) + self.extra_config)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen([str(self.venv / "bin" / "hass"), "-c", str(self.config_dir), "--skip-pip"],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self._get("/api/onboarding") is None:  # answers once http is up
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop()
                raise RuntimeError(f"hass did not start (exit {code}):\n{self.log_tail()}")
            time.sleep(0.2)
        self._onboard()
        while self.request("GET", "/api/config")[1].get("state") != "RUNNING":  # every integration set up
            if time.monotonic() > deadline:
                raise RuntimeError(f"hass did not finish starting:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def _onboard(self) -> None:
        client_id = f"{self.url}/"
        status, user = self.request("POST", "/api/onboarding/users", {
            "client_id": client_id, "name": "Test", "username": "test", "password": "test-password",
            "language": "en"})
        assert status == 200, (status, user)
        form = f"grant_type=authorization_code&code={user['auth_code']}&client_id={client_id}".encode()
        with urllib.request.urlopen(f"{self.url}/auth/token", data=form, timeout=30) as resp:
            access = json.loads(resp.read())["access_token"]
        # What a user pastes into the agent: a long-lived token, made over the WebSocket API.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            self.token = pool.submit(asyncio.run, self._long_lived_token(access)).result()

    async def _long_lived_token(self, access: str) -> str:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{self.url}/api/websocket") as ws:
            assert (await ws.receive_json())["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": access})
            assert (await ws.receive_json())["type"] == "auth_ok"
            await ws.send_json({"id": 1, "type": "auth/long_lived_access_token", "client_name": "voice-agent tests",
                                "lifespan": 1})
            answer = await ws.receive_json()
            assert answer.get("success"), answer
            return answer["result"]

    def log_tail(self, chars: int = 4000) -> str:
        return self.output.read_text(errors="replace")[-chars:] if self.output.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> HomeAssistant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
