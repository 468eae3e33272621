"""Transports: the ways audio reaches a session (WebRTC, files, LiveKit, Wyoming)."""
