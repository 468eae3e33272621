"""Plugin API: plugins see every event, send commands, and contribute tools and prompt text.

A plugin is a `Plugin` subclass with a pydantic `Config`. `PluginHost.from_config` finds
plugin classes through the `voice_agent.plugins` entry-point group (or an explicit
`{name: class}` mapping), validates every config before anything starts, and later feeds
each started plugin from its own bounded bus subscription, so one slow or failing plugin
never affects the sessions or the other plugins.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.bus import CommandTarget, EventBus, Subscription, SubscriptionClosed
from agent.errors import describe_validation_error
from agent.events import Event
from agent.tools import Tool

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "voice_agent.plugins"


class PluginConfig(BaseModel):
    """Base for plugin configs: unknown keys are errors, so typos fail at load time."""

    model_config = ConfigDict(extra="forbid")


class SessionFactory(Protocol):
    """What transports started as plugins (the LiveKit room) open sessions with: the
    `AgentRuntime`. Returns the session and its events, `session.started` first."""

    def open_session(self, session_id: str | None = None, **options: Any) -> tuple[Any, Subscription]: ...


@dataclass
class PluginContext:
    bus: EventBus
    commands: CommandTarget
    agent_id: str = "agent"
    sessions: SessionFactory | None = None  # None where sessions cannot be created (e.g. tests)
    # serve --processes N: False for a session another frontend holds (None: agent-wide, frontend 0).
    owns: Callable[[str | None], bool] = lambda session_id: True
    frontend: int | None = None  # this process's frontend index (None: the only process)


class Plugin:
    name: ClassVar[str] = "plugin"
    Config: ClassVar[type[BaseModel]] = PluginConfig
    queue_size: ClassVar[int] = 4096  # its bus backlog before deltas merge (policy: agent/bus.py)

    def __init__(self, config: Any, context: PluginContext) -> None:
        self.config = config
        self.context = context

    def start_timeout_s(self) -> float | None:
        """How long `start()` may take when its config says so (e.g. a connect timeout);
        None: the host's default. The host waits for the longer of the two."""
        return None

    async def start(self) -> None:
        """Connect; raising here disables this plugin only."""

    async def stop(self) -> None:
        """Disconnect and release everything; called once, also after a failed start."""

    def tools(self) -> list[Tool]:
        return []

    def system_prompt(self) -> str | None:
        return None

    async def on_event(self, event: Event) -> None:
        """Every event of every session, in order. Keep it quick: queue slow work."""


def _describe(exc: ValidationError) -> str:
    return describe_validation_error(exc, "(config)")


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_class(name: str, classes: Mapping[str, type[Plugin]] | None) -> type[Plugin]:
    if classes and name in classes:
        return classes[name]
    eps = _entry_points()
    try:
        if name in eps:
            cls = eps[name].load()
        else:
            known = sorted(set(eps) | set(classes or {}))
            raise ValueError(f"unknown plugin {name!r}; available: {', '.join(known) or 'none'}")
    except ImportError as exc:  # e.g. its optional dependency is not installed
        raise ValueError(f"plugin {name!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ValueError(f"plugin {name!r} does not name a Plugin subclass (got {cls!r})")
    return cls


class PluginHost:
    def __init__(self, plugins: list[Plugin], context: PluginContext, start_timeout: float = 30.0,
                 drain_timeout: float = 5.0) -> None:
        self.context = context
        self.configured = list(plugins)
        self.running: list[Plugin] = []
        self.failed: dict[str, str] = {}  # plugin name → why it was disabled
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self._subs: dict[int, Subscription] = {}
        self._feeds: dict[int, asyncio.Task[None]] = {}

    @classmethod
    def from_config(cls, mapping: Mapping[str, Mapping[str, Any] | None], context: PluginContext, *,
                    classes: Mapping[str, type[Plugin]] | None = None, **options: Any) -> PluginHost:
        """Instantiate the configured plugins; raises ValueError naming every problem first."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"plugins must be a mapping of name → config, got {type(mapping).__name__}")
        plugins: list[Plugin] = []
        problems: list[str] = []
        for name, raw in mapping.items():
            try:
                plugin_cls = _load_class(name, classes)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if raw is not None and not isinstance(raw, Mapping):
                problems.append(f"plugin {name!r}: config must be a mapping, got {type(raw).__name__}")
                continue
            try:
                config = plugin_cls.Config.model_validate(dict(raw or {}))
            except ValidationError as exc:
                problems.append(f"plugin {name!r}: invalid config: {_describe(exc)}")
                continue
            try:
                plugins.append(plugin_cls(config, context))
            except Exception as exc:  # constructors should not fail, but say which one did
                problems.append(f"plugin {name!r}: {type(exc).__name__}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(plugins, context, **options)

    async def start(self) -> None:
        for plugin in self.configured:
            # Subscribe before start so that no event published meanwhile is missed.
            sub = self.context.bus.subscribe(maxsize=plugin.queue_size, name=f"plugin {plugin.name}")
            try:
                await asyncio.wait_for(plugin.start(), max(self.start_timeout, plugin.start_timeout_s() or 0))
            except Exception as exc:
                sub.close()
                reason = "start timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
                self.failed[plugin.name] = reason
                log.error("plugin %s failed to start and is disabled: %s", plugin.name, reason)
                await self._safe_stop(plugin)
                continue
            self.running.append(plugin)
            self._subs[id(plugin)] = sub
            self._feeds[id(plugin)] = asyncio.create_task(self._feed(plugin, sub), name=f"plugin-{plugin.name}")
            log.info("plugin %s started", plugin.name)

    async def _feed(self, plugin: Plugin, sub: Subscription) -> None:
        while True:
            try:
                event = await sub.get()
            except SubscriptionClosed as exc:  # it fell too far behind: the bus logged and counted it
                self.failed[plugin.name] = "disconnected from the event bus"
                log.error("plugin %s gets no more events: %s", plugin.name, exc)
                return
            try:
                await plugin.on_event(event)
            except Exception:  # one bad event must not stop the plugin's stream
                log.exception("plugin %s failed on a %s event", plugin.name, getattr(event, "type", "?"))
            finally:
                sub.queue.task_done()

    async def stop(self) -> None:
        for plugin in reversed(self.running):
            sub, feed = self._subs.pop(id(plugin)), self._feeds.pop(id(plugin))
            sub.close()
            try:  # let it handle what was already published (e.g. a session's last events)
                await asyncio.wait_for(sub.queue.join(), self.drain_timeout)
            except TimeoutError:
                log.warning("plugin %s: %d events not handled at stop", plugin.name, sub.queue.qsize())
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
            await self._safe_stop(plugin)
        self.running.clear()

    async def _safe_stop(self, plugin: Plugin) -> None:
        try:
            await asyncio.wait_for(plugin.stop(), self.start_timeout)
        except Exception as exc:
            log.error("plugin %s failed to stop cleanly: %s: %s", plugin.name, type(exc).__name__, exc)

    def status(self) -> dict[str, str]:
        """Plugin name → "running" or "failed" (the reason is in the log, not here: /healthz is public)."""
        return {**{p.name: "running" for p in self.running}, **{name: "failed" for name in self.failed}}

    def tools(self) -> list[Tool]:
        out: list[Tool] = []
        for plugin in self.running:
            try:
                out += plugin.tools()
            except Exception:
                log.exception("plugin %s: tools() failed; it contributes none", plugin.name)
        return out

    def system_prompt(self) -> str | None:
        parts: list[str] = []
        for plugin in self.running:
            try:
                text = plugin.system_prompt()
            except Exception:
                log.exception("plugin %s: system_prompt() failed", plugin.name)
                continue
            if text:
                parts.append(text.strip())
        return "\n\n".join(parts) or None
