"""The playground's 👍/👎 in a real headless Chromium: a correction typed on the page lands in
the recording (`--record`)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.record import RecordingStore
from agent.runtime import AgentRuntime
from tests.rtc_util import loopback_only
from tests.speech import make_speech
from tests.test_browser import chromium
from tests.test_server import start_server, until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs /usr/bin/chromium and chromedriver")]


def feedback_rows(directory: Path) -> list[dict[str, Any]]:
    store = RecordingStore.open(directory, create=False)
    try:
        return store.feedback()
    finally:
        store.close()


async def test_thumbs_down_and_correction_from_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    loopback_only(monkeypatch)
    speech = make_speech([1.0, "turn on the kitchen light", 2.0], "browser")
    rec = tmp_path / "rec"
    runtime = AgentRuntime(load_settings(None, record=str(rec)),
                           backend=ScriptedBackend(default="The garage door is open."))
    await runtime.start()
    server = await start_server(runtime)
    driver = await asyncio.to_thread(chromium, speech.path, tmp_path / "profile")
    try:
        def page_flow() -> str:
            driver.get(server.url)
            driver.find_element(By.ID, "start").click()
            wait = WebDriverWait(driver, 90)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.done .feedback"))
            turn = driver.find_elements(By.CSS_SELECTOR, ".turn.done")[-1]
            turn.find_element(By.CSS_SELECTOR, ".feedback .down").click()
            turn.find_element(By.CSS_SELECTOR, ".feedback input").send_keys("The kitchen light is on.")
            turn.find_element(By.CSS_SELECTOR, ".feedback .fix").click()
            wait.until(lambda d: "correction" in turn.find_element(By.CSS_SELECTOR, ".feedback .note").text)
            return str(turn.get_attribute("data-turn"))

        turn_id = await asyncio.to_thread(page_flow)
        await until(lambda: any(f["correction"] for f in feedback_rows(rec)), timeout=15)
        rows = feedback_rows(rec)
        assert [(f["turn_id"], f["rating"], f["correction"]) for f in rows] == [
            (turn_id, "down", None), (turn_id, "down", "The kitchen light is on.")]
    finally:
        await asyncio.to_thread(driver.quit)
        await server.runner.cleanup()
        await runtime.close()
