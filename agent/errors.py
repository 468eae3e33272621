"""One way to say what is wrong with validated input (config, commands, plugin configs)."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, root: str = "(input)") -> str:
    """`a.b: message; c: message` — each problem with where it is; `root` names the whole."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in exc.errors())
