"""Exported rows read by a trainer's own code: LLaMA-Factory's dataset parser and converter.

Not a dependency of the project (LLaMA-Factory pins its own torch, transformers, peft): this
side check runs when `llamafactory` is importable, e.g. installed aside with
`pip install --target DIR --no-deps llamafactory peft datasets` and DIR named in
`VOICE_AGENT_TRAINERS_PATH` (appended to sys.path, so the project's own packages win). Only the
two modules that read rows are loaded (`llamafactory.data.parser`, `.converter`); the
package's `__init__` would import every model plugin (torchaudio, vision, …).

    python -m tests.trainer_loaders OUT_DIR DATASET_NAME   # checks every row, exit 1 on a bad one
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any


def _add_path() -> None:
    extra = os.environ.get("VOICE_AGENT_TRAINERS_PATH")
    for part in (extra or "").split(os.pathsep):
        if part and part not in sys.path:
            sys.path.append(part)


def llamafactory_modules() -> tuple[Any, Any] | None:
    """(parser, converter) modules of LLaMA-Factory, or None when it is not installed."""
    _add_path()
    if "llamafactory.data.converter" in sys.modules:
        return sys.modules["llamafactory.data.parser"], sys.modules["llamafactory.data.converter"]
    spec = importlib.util.find_spec("llamafactory")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    for name, folder in (("llamafactory", root), ("llamafactory.data", root / "data")):
        if name not in sys.modules:  # a bare package: its __init__ (every plugin) is not run
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module
    import llamafactory.data.converter as converter
    import llamafactory.data.parser as parser

    return parser, converter


def check_llamafactory(out_dir: str | Path, dataset: str) -> list[dict[str, Any]]:
    """Every row of `dataset` (from `out_dir/dataset_info.json`) through LLaMA-Factory's
    converter; the converted rows. Raises AssertionError on a row it would skip or misread."""
    modules = llamafactory_modules()
    if modules is None:
        raise RuntimeError("llamafactory is not installed")
    parser, converter = modules
    (attr,) = parser.get_dataset_list([dataset], str(out_dir))
    rows = json.loads((Path(out_dir) / attr.dataset_name).read_text())
    args = types.SimpleNamespace(media_dir=str(out_dir))
    convert = converter.get_dataset_converter(attr.formatting, attr, args)
    converted = []
    for i, row in enumerate(rows):
        out = convert(row)
        assert out["_prompt"] and out["_response"], f"row {i}: LLaMA-Factory skips it as abnormal"
        audios = out["_audios"] or []
        tags = sum(m["content"].count("<audio>") for m in out["_prompt"] + out["_response"])
        assert tags == len(audios), f"row {i}: {tags} <audio> tags, {len(audios)} audios"
        assert all(Path(a).is_file() for a in audios), f"row {i}: an audio file is missing"
        assert out["_prompt"][-1]["role"] == "user", f"row {i}: the prompt must end with the user"
        if attr.ranking:
            assert [r["role"] for r in out["_response"]] == ["assistant", "assistant"], f"row {i}"
        converted.append(out)
    return converted


if __name__ == "__main__":
    n = len(check_llamafactory(sys.argv[1], sys.argv[2]))
    print(f"{n} rows read by LLaMA-Factory's converter")
