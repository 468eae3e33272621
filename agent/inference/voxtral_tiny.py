"""Voxtral in process: its tokenizer (mistral-common's tekken), loading, and the tiny model.

transformers' `VoxtralForConditionalGeneration` reads the Hugging Face layout (config.json,
model.safetensors) and its tokenizer is `MistralCommonBackend` over the checkpoint's
`tekken.json` (mistral-common is required: without it the load is refused with the command
that installs it). The tiny tokenizer is a tekken v7 file written here: the 256 byte tokens
(no merges), the v7 special tokens at their ranks, `[AUDIO]` at 24 and `[BEGIN_AUDIO]` at 25
as in the released checkpoints (transformers' VoxtralProcessor assumes 24), and an audio
section (16 kHz, 12.5 frames per second, 128 mel bins, 30 s chunks).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from agent.inference.families import MissingDependency, TextAudioProcessor

INSTALL = "pip install 'qwen-voice-agent[voxtral]' (mistral-common)"
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
            "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]", "<SPECIAL_22>",
            "<SPECIAL_23>", "[AUDIO]", "[BEGIN_AUDIO]", "[TRANSCRIBE]")
NUM_SPECIAL = 40


def require_mistral_common() -> None:
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        raise MissingDependency(f"Voxtral's tokenizer needs mistral-common: {INSTALL}") from None


def tekken_json() -> dict[str, Any]:
    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": chr(i) if 32 <= i < 127 else None}
             for i in range(256)]
    return {
        "config": {"pattern": PATTERN, "num_vocab_tokens": 256, "default_vocab_size": 256 + NUM_SPECIAL,
                   "default_num_special_tokens": NUM_SPECIAL, "version": "v7"},
        "vocab": vocab,
        "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(SPECIALS)],
        "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
                  "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}},
    }


def load_tokenizer(source: str | Path) -> Any:
    """transformers' `MistralCommonBackend` over the checkpoint's tekken.json, padded left."""
    require_mistral_common()
    from transformers.tokenization_mistral_common import MistralCommonBackend

    tokenizer = MistralCommonBackend.from_pretrained(str(source))
    tokenizer.padding_side = "left"
    return tokenizer


def processor(source: str | Path) -> TextAudioProcessor:
    from transformers import WhisperFeatureExtractor

    tokenizer = load_tokenizer(source)
    return TextAudioProcessor(tokenizer, WhisperFeatureExtractor(feature_size=128),
                              int(tokenizer.convert_tokens_to_ids("[AUDIO]")))


def build(target: Path) -> None:
    """A tiny random Voxtral in the Hugging Face layout, with its tekken.json. Text head size
    32 (vLLM's CPU attention refuses 16); the encoder's intermediate size is 4× its width,
    which its projector reshapes to (4 frames per audio token)."""
    require_mistral_common()
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    target.mkdir(parents=True, exist_ok=True)
    (target / "tekken.json").write_text(json.dumps(tekken_json()))
    vocab = 256 + NUM_SPECIAL
    config = VoxtralConfig(
        audio_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_mel_bins=128, max_source_positions=1500, vocab_size=vocab),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, vocab_size=vocab,
                         max_position_embeddings=8192, rope_theta=1e8, bos_token_id=1, eos_token_id=2, pad_token_id=11),
        audio_token_id=24)
    torch.manual_seed(1234)
    model = VoxtralForConditionalGeneration(config).eval()
    model.save_pretrained(target)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(target)


def load(source: str, dtype: Any, device: str) -> tuple[Any, TextAudioProcessor]:
    require_mistral_common()
    from transformers import VoxtralForConditionalGeneration

    model = VoxtralForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device)
    return model.eval(), processor(source)
