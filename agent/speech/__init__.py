"""Speech out: text → 16-bit PCM engines (espeak, piper, openai), a streaming chunker, the
TTS stage of one answer, and a real-time player. Nothing here runs on import."""

from agent.speech.base import SpeechEngine, TTSError, TTSSettings, load_engine
from agent.speech.chunker import Piece, TextChunker
from agent.speech.stage import SpeechChunk, SpeechStage, SpeechStats

__all__ = ["Piece", "SpeechChunk", "SpeechEngine", "SpeechStage", "SpeechStats", "TTSError", "TTSSettings",
           "TextChunker", "load_engine"]
