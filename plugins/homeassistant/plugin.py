"""Home Assistant plugin: tools over the allowed entities, their states in the system prompt.

Tools use Home Assistant's Assist intent names (HassTurnOn, HassTurnOff, HassLightSet,
HassClimateSetTemperature, HassGetState). Every call checks the allowlist (`allow_entities`,
or any entity of `allow_domains`) and turns HA failures (unreachable, 401, …) into error
results the model can read.
"""

# No `from __future__ import annotations`: the tools below are built from local
# Annotated types, which must stay real objects for their schemas.
import asyncio
import logging
from typing import Annotated, Any

from pydantic import AnyHttpUrl, Field

from agent.events import Event
from agent.plugin import Plugin, PluginConfig, PluginContext
from agent.tools import Tool
from plugins.homeassistant.client import HomeAssistantClient, HomeAssistantError
from plugins.homeassistant.discovery import Discovery, DiscoveryConfig

log = logging.getLogger(__name__)

# Domains whose entities have turn_on/turn_off services of their own.
SWITCHABLE = {"light", "switch", "fan", "input_boolean", "climate", "media_player", "siren", "humidifier"}


class HomeAssistantConfig(PluginConfig):
    url: AnyHttpUrl
    token: str = Field(min_length=1)
    allow_domains: list[str] = Field(default_factory=list)
    allow_entities: list[str] = Field(default_factory=list)
    timeout_s: float = Field(10.0, gt=0)
    summary_max_entities: int = Field(40, ge=0)
    websocket: bool = True  # follow state changes so the summary stays current
    mqtt: DiscoveryConfig | None = None


class HomeAssistantPlugin(Plugin):
    name = "homeassistant"
    Config = HomeAssistantConfig

    def __init__(self, config: HomeAssistantConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.config: HomeAssistantConfig = config
        self.client = HomeAssistantClient(str(config.url), config.token, config.timeout_s)
        self.states: dict[str, dict[str, Any]] = {}  # allowed entities only
        owner = not context.frontend  # serve --processes N: frontend 0 owns the device's announcements
        self.discovery = Discovery(config.mqtt, context.agent_id, owner=owner) if config.mqtt else None
        self.ws_ready = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    def allowed(self, entity_id: str) -> bool:
        return entity_id in self.config.allow_entities or entity_id.split(".", 1)[0] in self.config.allow_domains

    async def start(self) -> None:
        if self.discovery is not None:
            self.discovery.start()
        try:
            await self.refresh()
            log.info("homeassistant: %d allowed entities at %s", len(self.states), self.config.url)
        except HomeAssistantError as exc:
            # The agent still starts: tools answer with this error until HA is back.
            log.error("homeassistant: cannot read states: %s", exc)
        if self.config.websocket:
            self._watch = asyncio.create_task(self.client.watch(self._on_state, self._on_subscribed,
                                                                on_removed=self._on_removed))

    async def refresh(self) -> None:
        states = await self.client.states()
        self.states = {s["entity_id"]: s for s in states
                       if isinstance(s, dict) and isinstance(s.get("entity_id"), str) and self.allowed(s["entity_id"])}

    def _on_state(self, state: dict[str, Any]) -> None:
        entity_id = state.get("entity_id")
        if isinstance(entity_id, str) and self.allowed(entity_id):
            self.states[entity_id] = state

    async def _on_subscribed(self) -> None:
        """Each (re)subscription: read every state again, so what changed while the WebSocket
        was down (or while HA was unreachable at start) is not missing from the mirror."""
        try:
            await self.refresh()
        except HomeAssistantError as exc:
            log.warning("homeassistant: cannot re-read states: %s", exc)
        self.ws_ready.set()

    def _on_removed(self, entity_id: str) -> None:
        self.states.pop(entity_id, None)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
        await self.client.close()

    async def on_event(self, event: Event) -> None:
        if self.discovery is not None:
            self.discovery.on_event(event)

    def system_prompt(self) -> str | None:
        if not self.states or not self.config.summary_max_entities:
            return None
        lines = ["Home Assistant devices you can control (entity_id, name: state):"]
        for entity_id, s in sorted(self.states.items())[: self.config.summary_max_entities]:
            attrs = s.get("attributes") or {}
            extra = ""
            if "brightness" in attrs and attrs["brightness"] is not None:
                extra = f", brightness {round(attrs['brightness'] * 100 / 255)}%"
            elif "temperature" in attrs and attrs["temperature"] is not None:
                extra = f", target {attrs['temperature']}°"
            lines.append(f"- {entity_id}, {attrs.get('friendly_name', entity_id)}: {s.get('state')}{extra}")
        if len(self.states) > self.config.summary_max_entities:
            lines.append(f"(and {len(self.states) - self.config.summary_max_entities} more)")
        return "\n".join(lines)

    # ---- tools ------------------------------------------------------------------
    def _check(self, entity_id: str, domains: set[str] | None = None) -> str:
        if not self.allowed(entity_id):
            raise PermissionError(f"entity {entity_id!r} is not in the allowlist")
        domain = entity_id.split(".", 1)[0]
        if domains is not None and domain not in domains:
            raise ValueError(f"{entity_id} is a {domain}; this needs one of: {', '.join(sorted(domains))}")
        return domain

    async def _service(self, domain: str, service: str, data: dict[str, Any]) -> str:
        if data["entity_id"] not in self.states:
            # HA answers 200 (and does nothing) to a service call on an entity it does not have:
            # ask for an unknown one first, so the model hears "no such entity" instead of "done".
            self._on_state(await self.client.state(data["entity_id"]))
        await self.client.call_service(domain, service, data)
        return f"{domain}.{service} done for {data['entity_id']}"

    def tools(self) -> list[Tool]:
        # The allowlist, not every entity: the ids and states are in the system prompt already,
        # and five copies of a long list in the tool schemas would crowd out the history.
        allowed = ", ".join([f"{d}.*" for d in self.config.allow_domains] + self.config.allow_entities)
        entity_doc = f"Entity id such as light.kitchen (allowed: {allowed or 'none'})"
        EntityId = Annotated[str, Field(description=entity_doc)]

        async def HassTurnOn(entity_id: EntityId) -> str:
            domain = self._check(entity_id)
            if domain in SWITCHABLE:
                return await self._service(domain, "turn_on", {"entity_id": entity_id})
            return await self._service("homeassistant", "turn_on", {"entity_id": entity_id})

        async def HassTurnOff(entity_id: EntityId) -> str:
            domain = self._check(entity_id)
            if domain in SWITCHABLE:
                return await self._service(domain, "turn_off", {"entity_id": entity_id})
            return await self._service("homeassistant", "turn_off", {"entity_id": entity_id})

        async def HassLightSet(entity_id: EntityId,
                               brightness_pct: Annotated[int, Field(ge=0, le=100, description="0 to 100")]) -> str:
            self._check(entity_id, {"light"})
            return await self._service("light", "turn_on", {"entity_id": entity_id, "brightness_pct": brightness_pct})

        async def HassClimateSetTemperature(entity_id: EntityId,
                                            temperature: Annotated[float, Field(ge=-50, le=100)]) -> str:
            self._check(entity_id, {"climate", "water_heater"})
            domain = entity_id.split(".", 1)[0]
            return await self._service(domain, "set_temperature", {"entity_id": entity_id, "temperature": temperature})

        async def HassGetState(entity_id: EntityId) -> dict[str, Any]:
            self._check(entity_id)
            s = await self.client.state(entity_id)
            self._on_state(s)
            return {"entity_id": entity_id, "state": s.get("state"), "attributes": s.get("attributes", {})}

        return [
            Tool(HassTurnOn, description="Turn on a Home Assistant device."),
            Tool(HassTurnOff, description="Turn off a Home Assistant device."),
            Tool(HassLightSet, description="Set a light's brightness in percent."),
            Tool(HassClimateSetTemperature, description="Set the target temperature of a thermostat."),
            Tool(HassGetState, description="Read the current state of a Home Assistant entity."),
        ]
