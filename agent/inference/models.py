"""Loading Qwen2-Audio: a hub id or directory, or one of the built-in random models.

- `HUB_ID` / `PATH`: the real `from_pretrained` path (bf16 on CUDA) — what users run.
- `tiny-random`: the real classes with tiny sizes and random weights, built locally once and
  cached in the user cache dir. Tests and the offline demo use it; its words are gibberish.
- `random-7b`: the real 7B architecture with random weights, for GPU benchmarks.
- `auto`: the real model when CUDA is available, otherwise tiny-random (with a warning).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.model import family as families
from agent.model.family import Family
from agent.model.qwen2_audio import SPECIAL_TOKENS

log = logging.getLogger(__name__)

REAL_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
TINY_RANDOM = "tiny-random"
RANDOM_7B = "random-7b"
TINY_OMNI = "tiny-random-qwen2.5-omni"
TINY_VOXTRAL = "tiny-random-voxtral"
TINY_FAMILIES = (TINY_OMNI, TINY_VOXTRAL)  # tiny random models of the other families
NAMES = ("auto", TINY_RANDOM, RANDOM_7B, *TINY_FAMILIES)  # the names --model knows besides hub ids and directories
TINY_WARNING = "tiny-random model in use: answers are random gibberish (no GPU / no weights)"


class ModelLoadError(Exception):
    pass


@dataclass
class LoadedModel:
    name: str
    model: Any  # Qwen2AudioForConditionalGeneration
    processor: Any  # Qwen2AudioProcessor
    device: str
    warning: str | None = None
    family: Family = field(default_factory=families.default)


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("VOICE_AGENT_CACHE", user_cache_dir("qwen-voice-agent")))


def resolve(name: str) -> tuple[str, str | None]:
    """`auto` → the concrete model name, plus the warning to show if any."""
    if name != "auto":
        return name, TINY_WARNING if name in (TINY_RANDOM, *TINY_FAMILIES) else None
    import torch

    if torch.cuda.is_available():
        return REAL_MODEL, None
    log.warning("no CUDA device: --model auto falls back to %s. %s", TINY_RANDOM, TINY_WARNING)
    return TINY_RANDOM, TINY_WARNING


def build_processor() -> Any:
    """A byte-level Qwen2 tokenizer + Whisper features (128 mel) + the instruct chat template."""
    from transformers import Qwen2AudioProcessor, Qwen2Tokenizer, WhisperFeatureExtractor
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>",  # type: ignore[arg-type]
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.padding_side = "left"  # batched prompts need left padding
    template = Qwen2AudioProcessor.default_chat_template.fget(None)  # type: ignore[attr-defined]  # the real instruct template
    return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                               tokenizer=tokenizer, chat_template=template)


def _config(processor: Any, size: str) -> Any:
    from transformers import Qwen2AudioConfig

    tok = processor.tokenizer
    if size == "tiny":
        # Head size 32 (64 / 2 heads): vLLM's CPU attention refuses 16, so the same checkpoint
        # serves in vLLM too (`voice-agent model save tiny-random DIR`).
        audio = dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=len(tok))
    else:  # the published 7B shapes (see shared/qwen2-audio-7b-instruct/config.json)
        audio = dict(encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=156032)
    return Qwen2AudioConfig(  # type: ignore[call-arg]
        audio_config=dict(num_mel_bins=128, max_source_positions=1500, **audio),
        text_config=dict(model_type="qwen2", max_position_embeddings=8192, rope_theta=10000.0,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id, **text),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
        vocab_size=text["vocab_size"],
    )


def tiny_random_dir() -> Path:
    """Build tiny-random once (atomically: parallel test workers may race) and return its dir."""
    import tempfile

    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    target = cache_dir() / "tiny-random-v2"  # v2: head size 32
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    torch.manual_seed(1234)
    model = Qwen2AudioForConditionalGeneration(_config(processor, "tiny")).eval()
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # someone else finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_family_dir(name: str) -> Path:
    """Build a family's tiny random model once (atomically, as `tiny_random_dir`)."""
    import shutil
    import tempfile

    from agent.inference.families import build_tiny

    family = families.by_tiny_name(name)
    if family is None:
        raise ModelLoadError(f"no tiny model called {name!r}")
    target = cache_dir() / f"{name}-v2"  # v2: named special tokens (what processors read)
    if (target / "config.json").exists() or (target / "params.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        build_tiny(family, tmp)
        tmp.rename(target)
    except OSError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def source_dir(name: str) -> str:
    """Where a model name's files are: the tiny models' cache directories, else the name."""
    if name == TINY_RANDOM:
        return str(tiny_random_dir())
    if name in TINY_FAMILIES:
        return str(tiny_family_dir(name))
    return name


def load_tokenizer(name: str) -> Any | None:
    """The model's text tokenizer, for exact prompt budgets in the agent process (the model
    itself lives in workers or a server). Only files already on disk are read: a worker that
    loaded the model, or a prior download, put them there. None when there are none — text is
    then counted as bytes, which over-estimates Qwen's tokens about 4× (safe, but history is
    dropped sooner) — or for random-7b, whose byte-level tokenizer makes bytes exact."""
    if name == RANDOM_7B:
        return None
    # The agent process only counts prompt tokens: the Rust tokenizer's thread pool (one
    # thread per core, started on first use) buys nothing here and showed as thread growth.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    source = source_dir(name)
    try:
        if name == TINY_VOXTRAL or (Path(source) / "tekken.json").exists():
            from agent.inference.voxtral_tiny import load_tokenizer as load_tekken

            return load_tekken(source)
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as exc:
        hint = "" if Path(name).exists() else f" (`hf download {name} --include '*.json' --include '*.txt'` fetches them)"
        log.warning("no tokenizer files for %s on this machine (%s); prompt text is counted as bytes, "
                    "which keeps less history than fits%s", name, str(exc).splitlines()[0], hint)
        return None


def known_family(name: str | None) -> Family:
    """The family of a served or loaded model, for prompt budgets in the agent process, from
    what is on this machine only: a tiny model's name, a checkpoint directory, the local hub
    cache (`model_type`), else the name itself ("…Voxtral…", "…Qwen2.5-Omni…"); Qwen2-Audio's
    when none of them tells."""
    if not name or name in (TINY_RANDOM, RANDOM_7B):
        return families.default()
    family = families.by_tiny_name(name)
    if family is not None:
        return family
    path = Path(name)
    if path.is_dir() and not (path / "config.json").exists() and (path / "params.json").exists():
        return families.for_model_type("voxtral")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, local_files_only=True)
        return families.for_model_type(getattr(config, "model_type", None))
    except Exception:
        pass
    lowered = name.lower()
    if "voxtral" in lowered:
        return families.for_model_type("voxtral")
    if "qwen2.5-omni" in lowered or "qwen2_5_omni" in lowered:
        return families.for_model_type("qwen2_5_omni")
    return families.default()


def load(name: str = "auto", device: str | None = None) -> LoadedModel:
    """Load a model by name, hub id or directory. Raises ModelLoadError with a clear reason."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    name, warning = resolve(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name == RANDOM_7B:
        processor = build_processor()
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in bf16 on the GPU: never 34 GB of fp32 first
        try:
            with torch.device(device):
                model = Qwen2AudioForConditionalGeneration(_config(processor, "7b")).eval()
        finally:
            torch.set_default_dtype(default)
        # The byte-level tokenizer is small; the 7B embedding keeps its 156032 rows so the
        # compute per token is the real model's.
        return LoadedModel(name, model, processor, device, "random-7b: random weights, for benchmarks")
    source = source_dir(name)
    family = family_of(source, name)
    if family.name != "qwen2-audio":
        from agent.inference.families import MissingDependency, load_family

        try:
            model, processor = load_family(family, source, dtype, device)
        except (MissingDependency, ImportError) as exc:
            raise ModelLoadError(f"cannot load {family.title} model {name!r}: {exc}") from None
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {name!r}: {exc}".splitlines()[0]) from None
        return LoadedModel(name, model, processor, device, warning, family)
    try:
        processor = AutoProcessor.from_pretrained(source)
        processor.tokenizer.padding_side = "left"
        # Straight onto the device (accelerate's loader): no copy in host memory first, so a
        # worker's restart after a crash costs only the read of the weights.
        model = Qwen2AudioForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device).eval()  # type: ignore[arg-type]
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}".splitlines()[0]) from None
    return LoadedModel(name, model, processor, device, warning)


def family_of(source: str, name: str | None = None) -> Family:
    """The family of a checkpoint directory or hub id, from its `model_type` (a Mistral-format
    directory, `params.json` + `tekken.json`, is Voxtral). ModelLoadError when unknown."""
    from transformers import AutoConfig

    path = Path(source)
    if path.is_dir() and not (path / "config.json").exists() and (path / "params.json").exists():
        return families.for_model_type("voxtral")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name or source!r}: {exc}".splitlines()[0]) from None
    model_type = getattr(config, "model_type", None)
    try:
        return families.for_model_type(model_type)
    except families.UnknownFamily:
        raise ModelLoadError(f"{name or source!r} is not a Qwen2-Audio model nor one of the other audio families "
                             f"({', '.join(families.NAMES)}): model_type={model_type!r}") from None


def save(name: str, directory: str | Path) -> Path:
    """Write a model as a checkpoint directory any Qwen2-Audio server loads (config, weights,
    tokenizer, processor, chat template): `voice-agent model save tiny-random DIR`, then
    e.g. vLLM serves DIR. Refuses a directory that already holds files."""
    import shutil

    target = Path(directory).expanduser()
    if target.exists() and any(target.iterdir()):
        raise ModelLoadError(f"{target}: not empty")
    if resolve(name)[0] in (TINY_RANDOM, *TINY_FAMILIES):
        shutil.copytree(source_dir(resolve(name)[0]), target, dirs_exist_ok=True)
        return target
    loaded = load(name)
    loaded.model.save_pretrained(target)
    loaded.processor.save_pretrained(target)
    return target
