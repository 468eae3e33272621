import os

# Tests share two cores with everything else: keep torch to one thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `serve` subprocesses stay one process unless a test asks for frontends (--processes).
os.environ.setdefault("VOICE_AGENT_SERVER__PROCESSES", "1")
# Tests speak with espeak-ng, whose flat endings the default end-of-turn policy (Smart Turn with
# pitch and lengthening, calibrated on real people) often reads as unfinished, waiting up to
# max_silence_s: tests of other features keep the fixed silence rule their pauses were timed for.
# The default policy is tested where it is chosen, on real speech (test_turn_corpus,
# test_end_of_turn, test_smart_turn_pipecat), each naming its rule.
os.environ.setdefault("VOICE_AGENT_TURNS__END_OF_TURN", "silence")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tests.speech import Speech, make_speech, two_utterances  # noqa: E402


@pytest.fixture(scope="session")
def speech_two() -> Speech:
    return two_utterances()


@pytest.fixture(scope="session")
def make_speech_fixture():
    return make_speech
