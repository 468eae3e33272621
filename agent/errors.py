"""One way to say what is wrong with validated input (config, commands, plugin configs,
tool arguments, script files): `where.it.is: what is wrong; next.problem: …`; and the strict
number types (`Int`, `Float`) that keep `true` from passing for 1."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ValidationError

# pydantic prefixes errors raised by our own validators with this; the reason reads better without.
_VALUE_ERROR = "Value error, "


def describe_validation_error(exc: ValidationError, root: str = "(input)",
                              model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """`loc: msg` for every problem, joined by `; `. `root` names a problem of the whole
    input (an empty location), e.g. "message" or "arguments" ("": no prefix). With `model`, a misspelled
    key says which known key it is close to; `prefix` places the input in a larger document."""
    problems = []
    for error in exc.errors(include_url=False):
        where = prefix + ".".join(str(part) for part in error["loc"]) or root
        if error["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(error["loc"][-1]), _known_keys(model, error["loc"][:-1]))
        else:
            message = _plain(error, model) or error["msg"].removeprefix(_VALUE_ERROR)
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


# pydantic's bound errors, said as what to write: "must be 1 or more, not 0".
_BOUNDS = {"greater_than_equal": ("ge", "{} or more"), "less_than_equal": ("le", "{} or less"),
           "greater_than": ("gt", "more than {}"), "less_than": ("lt", "less than {}")}


def _plain(error: Any, model: type[BaseModel] | None) -> str | None:
    """What to write instead, for the errors whose pydantic wording only states the rule."""
    ctx, value = error.get("ctx") or {}, error.get("input")
    if error["type"] in _BOUNDS:
        key, rule = _BOUNDS[error["type"]]
        return f"must be {rule.format(ctx[key])}, not {value!r}"
    if error["type"] == "string_pattern_mismatch":
        examples = _field_examples(model, error["loc"])
        wanted = f"something like {examples[0]}" if examples else f"text matching {ctx['pattern']}"
        return f"expected {wanted}, not {value!r}"
    return None


def _field_examples(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[Any]:
    """The `examples` of the field at `path` ([] when it has none)."""
    owner = _model_at(model, path[:-1])
    field = owner.model_fields.get(str(path[-1])) if owner is not None and path else None
    return list(field.examples or []) if field is not None else []


def did_you_mean(name: str, known: list[str]) -> str:
    """` (did you mean x?)` for the closest known name, or ""."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _known_keys(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at `path`; [] when it is not a model."""
    model = _model_at(model, path)
    return list(model.model_fields) if model is not None else []


def _model_at(model: type[BaseModel] | None, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The (nested) model at `path`, or None when it is not a model."""
    for part in path:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def yaml_problem(exc: Exception) -> str:
    """`line N, column M: problem (context)` for a YAML syntax error: the line once, no
    excerpt of the parser's internal string."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; ValueError("PATH: reason") for a missing, unreadable, non-UTF-8
    or malformed file (the line once, no parser internals)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: {(exc.strerror or str(exc)).lower()}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}, {yaml_problem(exc)}") from None


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; in a config or a command that is a mistake, not a number.
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]  # an int field that refuses true/false
Float = Annotated[float, BeforeValidator(_not_bool)]  # a float field that refuses true/false
