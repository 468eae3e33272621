"""Framework adapters: the agent inside other agent frameworks (livekit-agents)."""
