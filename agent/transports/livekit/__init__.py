"""LiveKit room transport (livekit rtc + livekit-api): each participant's audio is a session.

    plugins:
      livekit: {url: "ws://127.0.0.1:7880", api_key: devkey, api_secret: secret, room: kitchen}
"""

from agent.transports.livekit.config import LiveKitConfig
from agent.transports.livekit.room import LiveKitPlugin

__all__ = ["LiveKitConfig", "LiveKitPlugin"]
