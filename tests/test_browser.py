"""The playground page in a real headless Chromium: fake microphone → WebRTC → turns on the page."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

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
        def page_flow() -> dict[str, Any]:
            driver.get(f"{server.url}/?token=pg")
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

        seen = await asyncio.to_thread(page_flow)
        assert "gibberish" in seen["banner"]
        assert "chat" in seen["badges"] and "analysis" in seen["badges"]
        assert seen["latency"].startswith("first token") and seen["response"]
        assert "speaker's emotion" in seen["instruction"]
        assert SCREENSHOT.stat().st_size > 0
        assert "session" in seen["header"] and seen["icon"].startswith("data:image/svg+xml")
        assert seen["peak"] > 0.3  # the level meter moved with the speech
        stopped = await asyncio.to_thread(after_stop)
        assert stopped == {"header": "not connected", "banner": False, "level": 0.0}
        await until(lambda: not runtime.sessions, timeout=30)
    finally:
        await asyncio.to_thread(driver.quit)
        await server.runner.cleanup()
        await runtime.close()
