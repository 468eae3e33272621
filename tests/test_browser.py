"""The playground page in a real headless Chromium: fake microphone → WebRTC → turns on the page."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent import tool
from agent.config import load_settings
from agent.runtime import AgentRuntime
from tests.rtc_util import loopback_only
from tests.speech import make_speech
from tests.test_server import start_server, until

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs /usr/bin/chromium and chromedriver")]

SCREENSHOT = Path(os.environ.get("PLAYGROUND_SCREENSHOT", "/tmp/playground.png"))


def chromium(wav: Path, profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={wav}", "--allow-loopback-in-peer-connection",
                 f"--user-data-dir={profile}", "--window-size=1200,820"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


async def test_playground_shows_turns_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    loopback_only(monkeypatch)
    speech = make_speech([1.0, "turn on the kitchen light", 2.0], "browser")  # Chromium loops it
    runtime = AgentRuntime(load_settings(None, model="tiny-random", max_new_tokens=8))
    await runtime.start()
    server = await start_server(runtime, token="pg")
    driver = await asyncio.to_thread(chromium, speech.path, tmp_path / "profile")
    try:
        def before_start() -> dict[str, Any]:
            driver.get(f"{server.url}/?token=pg")
            WebDriverWait(driver, 30).until(lambda d: "tiny-random" in d.find_element(By.ID, "model").text)
            return {"header": driver.find_element(By.ID, "model").text,
                    "banner": driver.find_element(By.ID, "banner").text}

        def page_flow() -> dict[str, Any]:
            driver.find_element(By.ID, "start").click()
            wait = WebDriverWait(driver, 90)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.done"))
            # The instruction box makes a later turn an analysis turn.
            driver.find_element(By.ID, "instr").send_keys("What is the speaker's emotion?")
            driver.find_element(By.ID, "instr-send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.done .badge.analysis"))
            driver.save_screenshot(str(SCREENSHOT))
            first = driver.find_elements(By.CSS_SELECTOR, ".turn.done")[-1]
            return {
                "banner": driver.find_element(By.ID, "banner").text,
                "badges": [b.text for b in driver.find_elements(By.CSS_SELECTOR, ".turn .badge")],
                "latency": first.find_element(By.CSS_SELECTOR, ".latency").text,
                "response": first.find_element(By.CSS_SELECTOR, ".resp").text,
                "instruction": driver.find_element(By.CSS_SELECTOR, ".turn .instr").text,
                "header": driver.find_element(By.ID, "model").text,
                "peak": float(driver.find_element(By.ID, "level").get_attribute("data-peak")),
                "icon": driver.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href"),
            }

        def after_stop() -> dict[str, Any]:
            driver.find_element(By.ID, "stop").click()
            return {"header": driver.find_element(By.ID, "model").text,
                    "banner": driver.find_element(By.ID, "banner").is_displayed(),
                    "level": float(driver.find_element(By.ID, "level").get_attribute("value"))}

        # Before connecting, the page says which model answers here, and warns about tiny-random.
        before = await asyncio.to_thread(before_start)
        assert before["header"] == "model tiny-random · not connected" and "gibberish" in before["banner"], before
        seen = await asyncio.to_thread(page_flow)
        assert "gibberish" in seen["banner"]
        assert "chat" in seen["badges"] and "analysis" in seen["badges"]
        assert seen["latency"].startswith("first token") and seen["response"]
        assert "speaker's emotion" in seen["instruction"]
        assert (await asyncio.to_thread(SCREENSHOT.stat)).st_size > 0
        assert "session" in seen["header"] and seen["icon"].startswith("data:image/svg+xml")
        assert seen["peak"] > 0.3  # the level meter moved with the speech
        stopped = await asyncio.to_thread(after_stop)
        assert stopped == {"header": "model tiny-random · not connected", "banner": True, "level": 0.0}
        await until(lambda: not runtime.sessions, timeout=30)
    finally:
        await asyncio.to_thread(driver.quit)
        await server.runner.cleanup()
        await runtime.close()


# Runs in the page: listens to the <audio id="voice"> element's stream through a WebAudio
# analyser for `ms`, and reports the loudest 50 ms window and how the element played.
LISTEN_JS = """
const [ms, done] = [arguments[0], arguments[arguments.length - 1]];
const el = document.getElementById("voice");
if (!el.srcObject) { done({error: "no srcObject on the audio element"}); return; }
const ctx = new AudioContext();
const analyser = ctx.createAnalyser();
analyser.fftSize = 2048;
ctx.createMediaStreamSource(el.srcObject).connect(analyser);
const buf = new Float32Array(analyser.fftSize);
const out = {peak_rms: 0, windows: 0, loud_windows: 0, t0: el.currentTime, paused: el.paused,
             ctx_state: null, track_state: el.srcObject.getAudioTracks().map((t) => t.readyState)};
ctx.resume().then(() => {
  out.ctx_state = ctx.state;
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const x of buf) sum += x * x;
    const rms = Math.sqrt(sum / buf.length);
    out.peak_rms = Math.max(out.peak_rms, rms);
    out.windows += 1;
    if (rms > 0.01) out.loud_windows += 1;
  }, 50);
  setTimeout(() => {
    clearInterval(timer);
    out.t1 = el.currentTime;
    out.paused_after = el.paused;
    out.agent = document.getElementById("agent").textContent;
    ctx.close();
    done(out);
  }, ms);
});
"""

@tool
def turn_on(entity_id: str) -> str:
    """Turn on a light."""
    return f"{entity_id} is on"


SPOKEN = ("Okay, the kitchen light is on now. It will stay on until you tell me to turn it off again, "
          "and I will keep listening in the meantime.")


async def test_playground_plays_the_agents_voice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `--tts espeak` the page's audio element plays the answer: an analyser on its
    stream hears non-silent samples while the agent speaks, and the element is playing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from agent.inference.scripted import ScriptedBackend

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    loopback_only(monkeypatch)
    # One utterance, then a long silence before Chromium loops the file: no second turn cuts the answer.
    speech = make_speech([1.0, "turn on the kitchen light", 20.0], "browser-voice")
    settings = load_settings(None, model="tiny-random", tts={"engine": "espeak"})
    call = '<tool_call>{"name": "turn_on", "arguments": {"entity_id": "light.kitchen"}}</tool_call>'
    runtime = AgentRuntime(settings, backend=ScriptedBackend([call], default=SPOKEN), tools=[turn_on])
    await runtime.start()
    server = await start_server(runtime, token="pg")
    driver = await asyncio.to_thread(chromium, speech.path, tmp_path / "profile")
    try:
        def page_flow() -> dict[str, Any]:
            driver.get(f"{server.url}/?token=pg")
            driver.find_element(By.ID, "start").click()  # a user gesture: the page may play sound
            wait = WebDriverWait(driver, 90)
            wait.until(lambda d: d.find_element(By.ID, "agent").text == "agent: speaking")
            driver.set_script_timeout(30)
            heard = driver.execute_async_script(LISTEN_JS, 2500)
            wait.until(lambda d: d.find_element(By.ID, "agent").text == "agent: listening")
            heard["resp"] = driver.find_elements(By.CSS_SELECTOR, ".turn.done .resp")[0].text
            heard["tools"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#tools div")]
            return heard

        heard = await asyncio.to_thread(page_flow)
        print(f"browser heard the agent: {heard}")
        assert "error" not in heard, heard
        assert heard["resp"] == SPOKEN
        call_line, result_line = heard["tools"]  # oldest first: the result sits below its call
        assert call_line.startswith("→ turn_on(") and result_line.startswith("← call_"), heard["tools"]
        assert heard["ctx_state"] == "running" and heard["track_state"] == ["live"]
        assert not heard["paused"] and not heard["paused_after"]  # the element plays …
        assert heard["t1"] - heard["t0"] > 1.0  # … and its clock runs with the stream
        assert heard["peak_rms"] > 0.02 and heard["loud_windows"] >= 5  # … sound, not silence
    finally:
        await asyncio.to_thread(driver.quit)
        await server.runner.cleanup()
        await runtime.close()
