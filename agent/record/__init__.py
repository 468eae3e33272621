"""Recording conversations (`--record DIR`): turns' audio, history, answers, tool calls and feedback."""

from agent.record.recorder import Recorder
from agent.record.store import RecordingStore, TurnRecord

__all__ = ["Recorder", "RecordingStore", "TurnRecord"]
