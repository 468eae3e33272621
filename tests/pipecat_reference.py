"""Smart Turn as its authors run it: pipecat-ai 1.14's Silero VAD analyzer (stop_secs 0.2) and
`LocalSmartTurnAnalyzerV3` (its buffering, pre-speech audio and 3 s fallback), composed as
pipecat's `TurnAnalyzerUserTurnStopStrategy` composes them, on a virtual clock.

Runs in the pipecat side environment (`.venv-pipecat`, `make pipecat`), not in ours: it imports
only numpy and pipecat. Usage: `python tests/pipecat_reference.py IN.f32 OUT.json` with IN raw
16 kHz mono float32; OUT: one entry per model call (`end`, `samples`: the segment it saw) and per commit, times in
seconds of audio.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

FRAME = 320  # 20 ms: the frames pipecat's transports deliver
SR = 16000


def main(src: str, dst: str) -> None:
    clock = [0.0]
    fed = [0]  # samples given to the turn analyzer so far
    time.monotonic = lambda: clock[0]  # pipecat's buffer keeps wall-clock stamps: make them audio time
    time.time = lambda: clock[0]

    from pipecat.audio.turn.base_turn_analyzer import EndOfTurnState
    from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState

    audio = np.fromfile(src, np.float32)
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    vad = SileroVADAnalyzer(sample_rate=SR, params=VADParams(stop_secs=0.2))
    vad.set_sample_rate(SR)
    turn = LocalSmartTurnAnalyzerV3(params=SmartTurnParams())  # stop_secs 3: the fallback
    turn.set_sample_rate(SR)
    events: list[dict[str, object]] = []
    predict = turn._predict_endpoint

    def recorded(segment: np.ndarray) -> dict[str, object]:
        result = predict(segment)
        events.append({"kind": "model", "t": clock[0], "end": fed[0], "samples": segment.size,
                       "p": float(result["probability"])})
        return result

    turn._predict_endpoint = recorded  # type: ignore[method-assign]

    async def run() -> None:
        speaking = False
        for i in range(0, pcm.size - FRAME + 1, FRAME):
            frame = pcm[i : i + FRAME].tobytes()
            clock[0] = (i + FRAME) / SR
            state = await vad.analyze_audio(frame)
            # The transport pushes the VAD's frames before the audio frame that caused them.
            if state == VADState.SPEAKING and not speaking:
                speaking = True
                turn.update_vad_start_secs(vad.params.start_secs)
                events.append({"kind": "vad_start", "t": clock[0]})
            elif state == VADState.QUIET and speaking:
                speaking = False
                events.append({"kind": "vad_stop", "t": clock[0]})
                verdict, _ = await turn.analyze_end_of_turn()
                if verdict == EndOfTurnState.COMPLETE:
                    events.append({"kind": "commit", "t": clock[0], "by": "model"})
            state = turn.append_audio(frame, speaking)
            fed[0] = i + FRAME
            if state == EndOfTurnState.COMPLETE:
                await turn.analyze_end_of_turn()
                events.append({"kind": "commit", "t": clock[0], "by": "fallback"})

    asyncio.run(run())
    with open(dst, "w") as f:
        json.dump(events, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
