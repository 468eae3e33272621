"""The livekit-agents adapter's chat context mirror stays bounded over a long call, and what
it let go of is never mistaken for new items (nothing reaches the conversation twice)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import llm

from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.integrations import livekit_agents
from agent.integrations.livekit_agents import QwenRealtimeModel
from agent.runtime import AgentRuntime


def user_texts(messages: list[dict[str, Any]]) -> list[str]:
    return [part["text"] for m in messages if m["role"] == "user" and isinstance(m["content"], list)
            for part in m["content"] if part.get("type") == "text"]


async def test_chat_ctx_is_bounded_and_trimmed_items_are_not_re_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(livekit_agents, "MAX_CHAT_ITEMS", 8)
    backend = ScriptedBackend(["ok"])
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend)
    await runtime.start()
    session = QwenRealtimeModel(runtime=runtime).session()
    full = llm.ChatContext.empty()  # livekit's own (agent) context: it keeps everything
    full.add_message(role="system", content="You are terse.")
    sent: list[str] = []
    for i in range(30):
        text = f"message {i}"
        sent.append(text)
        if i % 2:  # AgentActivity's way: our mirror, one item appended
            chat = session.chat_ctx
            item = chat.add_message(role="user", content=text)
            full.items.append(item)
            await session.update_chat_ctx(chat)
        else:  # or its whole, ever longer context
            full.add_message(role="user", content=text)
            await session.update_chat_ctx(full)
        assert len(session.chat_ctx.items) <= 8 + 1  # + the leading instructions truncate() keeps
    generation = await session.generate_reply()
    async for message in generation.message_stream:
        async for _ in message.text_stream:
            pass
    await session.aclose()
    await runtime.close()
    assert user_texts(backend.requests[0].messages) == sent  # each once, in order
    assert [m.text_content for m in session.chat_ctx.messages() if m.role == "user"][-1] == "message 29"


async def test_a_short_call_keeps_everything() -> None:
    backend = ScriptedBackend([])
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend)
    await runtime.start()
    session = QwenRealtimeModel(runtime=runtime).session()
    chat = llm.ChatContext.empty()
    for i in range(5):
        chat.add_message(role="user", content=f"m{i}")
    await session.update_chat_ctx(chat)
    assert [m.text_content for m in session.chat_ctx.messages()] == [f"m{i}" for i in range(5)]
    await asyncio.wait_for(session.aclose(), 10)
    await runtime.close()
