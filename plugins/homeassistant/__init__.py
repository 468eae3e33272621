"""Home Assistant plugin: REST + WebSocket tools, state summary, optional MQTT discovery."""

from plugins.homeassistant.plugin import HomeAssistantConfig, HomeAssistantPlugin

__all__ = ["HomeAssistantConfig", "HomeAssistantPlugin"]
