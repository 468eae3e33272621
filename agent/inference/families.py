"""Loading the families other than Qwen2-Audio, and their offline tiny random models.

The engine needs of a processor only its tokenizer, its feature extractor and the audio
token's id (`TextAudioProcessor`): the full `Qwen2_5OmniProcessor` also builds image and video
processors, which need torchvision, and the agent sends neither.

- Qwen2.5-Omni: a checkpoint is the whole model (`model_type` "qwen2_5_omni": thinker, talker,
  token2wav) or a thinker (`qwen2_5_omni_thinker`). The agent loads the thinker only
  (`enable_audio_output=False`: no talker weights read). The tiny model is saved as the whole
  model without a talker, the layout vLLM serves.
- Voxtral: see `agent.inference.voxtral_tiny`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.model import qwen2_5_omni
from agent.model.family import Family


class MissingDependency(Exception):
    """A family needs a package that is not installed (the message says which and how)."""


@dataclass
class TextAudioProcessor:
    tokenizer: Any
    feature_extractor: Any
    audio_token_id: int

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)


def byte_level_tokenizer(specials: tuple[str, ...], chat_template: str | None,
                         named: dict[str, str] | None = None) -> Any:
    """A Qwen2 tokenizer over the 256 byte symbols, no merges, plus the family's specials
    (`named`: the ones a processor reads as attributes, e.g. `tokenizer.audio_token`)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>",  # type: ignore[arg-type]
                               pad_token="<|endoftext|>", extra_special_tokens=named or {})
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t != "<|endoftext|>"]})
    tokenizer.padding_side = "left"
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# ---- Qwen2.5-Omni ---------------------------------------------------------------------------
def omni_processor(tokenizer: Any, feature_extractor: Any) -> TextAudioProcessor:
    return TextAudioProcessor(tokenizer, feature_extractor,
                              int(tokenizer.convert_tokens_to_ids(qwen2_5_omni.AUDIO_TOKEN)))


def build_tiny_omni(target: Path) -> None:
    """Write a tiny random Qwen2.5-Omni (whole-model layout, no talker) into `target`.
    Text head size 32 with mrope sections [4, 6, 6] (vLLM's CPU attention refuses 16)."""
    import torch
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

    named = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
             "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
             "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}  # what its processor reads
    tokenizer = byte_level_tokenizer(qwen2_5_omni.SPECIAL_TOKENS, qwen2_5_omni.CHAT_TEMPLATE, named)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in qwen2_5_omni.SPECIAL_TOKENS}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=8192,
                rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [4, 6, 6]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    audio = dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, output_dim=64,
                 num_mel_bins=128, max_source_positions=1500, n_window=100)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[0])
    tokens = dict(audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
                  video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
                  audio_end_token_id=ids["<|audio_eos|>"], vision_start_token_id=ids["<|vision_bos|>"],
                  vision_end_token_id=ids["<|vision_eos|>"], user_token_id=0)
    config = Qwen2_5OmniConfig(thinker_config=dict(text_config=text, audio_config=audio, vision_config=vision, **tokens),
                               enable_audio_output=False)
    torch.manual_seed(1234)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    model.save_pretrained(target)
    torch.save({}, target / "spk_dict.pt")  # from_pretrained of the whole model reads the speakers
    tokenizer.save_pretrained(target)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(target)
    # what vLLM's processor reads besides (Qwen2-VL image/video processors, the template)
    processor_config = {"processor_class": "Qwen2_5OmniProcessor"}
    (target / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    pre = json.loads((target / "preprocessor_config.json").read_text())
    pre.update({"processor_class": "Qwen2_5OmniProcessor", "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]})
    (target / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def load_omni(source: str, dtype: Any, device: str) -> tuple[Any, TextAudioProcessor]:
    """The thinker of a Qwen2.5-Omni checkpoint (whole model or thinker only) and its processor."""
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoTokenizer,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(source)
    if config.model_type == "qwen2_5_omni_thinker":
        thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device)
    else:
        whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device,
                                                                    enable_audio_output=False)
        thinker = whole.thinker
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    return thinker.eval(), omni_processor(tokenizer, AutoFeatureExtractor.from_pretrained(source))


# ---- dispatch -------------------------------------------------------------------------------
def build_tiny(family: Family, target: Path) -> None:
    if family.name == "qwen2.5-omni":
        build_tiny_omni(target)
    elif family.name == "voxtral":
        from agent.inference import voxtral_tiny

        voxtral_tiny.build(target)
    else:
        raise ValueError(f"no tiny builder for {family.name}")


def load_family(family: Family, source: str, dtype: Any, device: str) -> tuple[Any, Any]:
    if family.name == "qwen2.5-omni":
        return load_omni(source, dtype, device)
    if family.name == "voxtral":
        from agent.inference import voxtral_tiny

        return voxtral_tiny.load(source, dtype, device)
    raise ValueError(f"no loader for {family.name}")


class OneMask:
    """A text model whose forward takes one 4-D mask, not the engine's per-layer-type dict
    (Llama's, in Voxtral; Qwen2's take the dict as it is). Everything else passes through."""

    def __init__(self, lm: Any) -> None:
        self._lm = lm

    def __call__(self, *, attention_mask: Any = None, **kwargs: Any) -> Any:
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask["full_attention"]
        return self._lm(attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lm, name)


def text_model(model: Any) -> Any:
    """The language model the engine drives (the model's `model.language_model`)."""
    lm = model.model.language_model
    return OneMask(lm) if getattr(model.config, "model_type", "") == "voxtral" else lm
