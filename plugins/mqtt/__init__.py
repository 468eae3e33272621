"""MQTT plugin (aiomqtt<3)."""

from plugins.mqtt.plugin import MqttConfig, MqttPlugin

__all__ = ["MqttConfig", "MqttPlugin"]
