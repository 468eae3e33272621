"""Speech out: text → 16-bit PCM engines (espeak, piper, openai), a streaming chunker, the
TTS stage of one answer, and a real-time player. Nothing here runs on import.

Wiring, as a session/transport would do it:

    engine = load_engine(settings.tts)        # None for `engine: none`; once per process,
    await engine.start()                      # shared by sessions (raises TTSError)
    player = Player(on_started=…, on_done=…)  # one per session: response.audio.started/done
    pc.addTrack(AgentAudioTrack(player))      # WebRTC (agent.speech.track): 20 ms, 48 kHz, paced
    # per answer, fed the turn's response.delta texts:
    task = asyncio.create_task(play_answer(player, SpeechStage(engine, deltas, on_error=…), turn_id))
    # speech over it: player.pause() at once, then player.resume() (a backchannel) or
    # barge-in: report = player.flush(); task.cancel() — decided by overlap.py / bargein.py
    #   → response.cancelled with report.spoken_text; keep only that in the history
    # TTSError out of the task (fatal) or via on_error (one piece lost) → an `error` event;
    # the text answer is unaffected. `player.speaking` / `recent_output()` say what is playing.
"""

from agent.speech.base import SpeechEngine, TTSError, TTSSettings, available_engines, load_engine
from agent.speech.chunker import Piece, TextChunker
from agent.speech.playback import Pacer, PlaybackReport, Player, play_answer
from agent.speech.stage import SpeechChunk, SpeechStage, SpeechStats

__all__ = ["Pacer", "Piece", "PlaybackReport", "Player", "SpeechChunk", "SpeechEngine", "SpeechStage",
           "SpeechStats", "TTSError", "TTSSettings", "TextChunker", "available_engines", "load_engine",
           "play_answer"]
