"""What an OpenAI-compatible server serves, and whether it is up (for `agent.inference.openai`).

`GET {base}/models` is the one call every such server answers (vLLM adds each model's
`max_model_len`, and `root`, the checkpoint it loaded). The backend reads it at start — the
model's name when exactly one is served, the context length to budget prompts within — and
a `HealthProbe` asks it again every few seconds, so `/healthz` says 503 while the server is
down and 200 once it is back, as it does for local workers. Our own `serve-model` answers its
model list while no worker is up, so for it the probe also asks its `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from agent.inference.base import InferenceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    id: str  # the name requests use
    root: str | None = None  # vLLM: the checkpoint (hub id or path) behind it, for the tokenizer
    max_model_len: int | None = None  # vLLM: prompt + answer tokens one request may take


async def list_models(http: aiohttp.ClientSession, base_url: str,
                      timeout: aiohttp.ClientTimeout | None = None) -> list[ServedModel]:
    """The models `base_url` serves; InferenceError (backend_unavailable) when it does not answer."""
    url = f"{base_url}/models"
    try:
        async with http.get(url, timeout=timeout) as response:
            if response.status >= 400:
                raise InferenceError("backend_unavailable", f"{url}: HTTP {response.status}")
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise InferenceError("backend_unavailable", f"cannot reach {url}: {exc or type(exc).__name__}") from None
    rows = body.get("data") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise InferenceError("backend_error", f"{url}: not a model list: {str(body)[:200]!r}")
    models = []
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            length = row.get("max_model_len")
            models.append(ServedModel(row["id"], row.get("root") if isinstance(row.get("root"), str) else None,
                                      length if isinstance(length, int) and length > 0 else None))
    return models


def pick(requested: str | None, served: list[ServedModel], base_url: str) -> ServedModel:
    """The served model a request names: `requested`, or the only one served. InferenceError
    naming what is served otherwise."""
    names = ", ".join(m.id for m in served) or "none"
    if requested is None:
        if len(served) == 1:
            return served[0]
        raise InferenceError("backend_error", f"{base_url} serves {len(served)} models ({names}): "
                             "choose one with --openai-model")
    for model in served:
        if requested in (model.id, model.root):
            return model
    raise InferenceError("backend_error", f"model {requested!r} is not served by {base_url} (it serves: {names}); "
                         "set --openai-model to one of them")


class HealthProbe:
    """Asks `/models` every `interval_s` seconds; `up` is the last answer. `on_models` gets each
    successful answer (the backend learns the model's name and context once the server is up)."""

    def __init__(self, http: Callable[[], aiohttp.ClientSession | None], base_url: str, interval_s: float,
                 timeout_s: float, on_models: Callable[[list[ServedModel]], None],
                 readiness: Callable[[], str | None] = lambda: None) -> None:
        self._http = http
        self._readiness = readiness  # our serve-model's /readyz: its model list answers with no worker up
        self.reason: str | None = None  # why it is down (the server's own words when it gave them)
        self._base_url = base_url
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._on_models = on_models
        self._task: asyncio.Task[None] | None = None
        self.up = False

    async def check(self) -> list[ServedModel]:
        """One probe now; raises InferenceError when the server does not answer."""
        http = self._http()
        if http is None:
            raise InferenceError("backend_unavailable", f"OpenAI backend for {self._base_url} is not started")
        try:
            models = await list_models(http, self._base_url, self._timeout)
            self._on_models(models)
            if (url := self._readiness()) is not None:
                await self._ready(http, url)
        except InferenceError as exc:
            self.reason = exc.message
            self.mark(False)
            raise
        self.reason = None
        self.mark(True)
        return models

    async def _ready(self, http: aiohttp.ClientSession, url: str) -> None:
        try:
            async with http.get(url, timeout=self._timeout) as response:
                if response.status in (200, 404):  # 404: a serve-model older than /readyz
                    return
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise InferenceError("backend_unavailable", f"cannot reach {url}: {exc or type(exc).__name__}") from None
        reason = body.get("reason") if isinstance(body, dict) else None
        raise InferenceError("backend_unavailable", f"{url}: {reason or 'not ready'}")

    def mark(self, up: bool) -> None:
        if up != self.up:
            (log.info if up else log.warning)("OpenAI server %s is %s", self._base_url, "up" if up else "down")
        self.up = up

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="openai-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            with contextlib.suppress(InferenceError):
                await self.check()
