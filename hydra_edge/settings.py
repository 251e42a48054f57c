"""Settings as dataclass fields, written once: each field carries its default, its help and its
bounds, and every command, YAML file and UI form is built from the fields (cli/options.py turns a
settings class into a command's options; the UI reads bounds and choices from the same fields).

A choice is a `Literal[...]` type (choices.py); bounds are `ge`, `gt`, `lt`, `le`. `check_fields`
checks both once, whatever set the value (flag, YAML, UI, API). A command that takes a setting
another one defines (`clusters --max-k` and `finetune --max-k`) copies its field with `same_as`
instead of writing it again.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Literal

BOUND_TEXT = {"ge": ">=", "gt": ">", "lt": "<", "le": "<="}
_BOUND_OK = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "lt": lambda v, b: v < b,
    "le": lambda v, b: v <= b,
}


def setting(default, help: str, **bounds):
    """A dataclass field carrying its help and its bounds (ge, gt, lt, le); optionally `envvar`
    (read the value from it when the flag is not given), `flag` (a name of its own) and `refusal`
    (what to say instead of "must be >= N" when a bound fails)."""
    metadata = {"help": help, **bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def same_as(settings_class: type, name: str, **changes):
    """A copy of another settings class's field (default, help, bounds), for a command that takes
    the same setting; `changes` may replace the default or the help, say what differs."""
    original = {f.name: f for f in dataclasses.fields(settings_class)}[name]
    default = original.default_factory() if original.default is dataclasses.MISSING else original.default
    metadata = {**original.metadata, **{k: v for k, v in changes.items() if k != "default"}}
    return setting(changes.get("default", default), **metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def literal_choices(hint) -> tuple:
    """The values of a Literal[...] annotation (also inside `X | None`); () for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(hint) for c in literal_choices(arg))
    return ()


def bounds_of(f: dataclasses.Field) -> dict:
    return {k: f.metadata[k] for k in BOUND_TEXT if k in f.metadata}


def field_problems(settings) -> list[str]:
    """Every value outside its field's choices or bounds, as `--flag value: what to give`."""
    problems = []
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        choices = literal_choices(hints[f.name])
        if choices and value not in choices:
            problems.append(f"{flag(f.name)} {value}: use one of {', '.join(map(str, choices))}")
        bounds = bounds_of(f)
        if value is not None and bounds and not all(_BOUND_OK[k](value, b) for k, b in bounds.items()):
            text = "must be " + " and ".join(f"{BOUND_TEXT[k]} {b}" for k, b in bounds.items())
            problems.append(f"{flag(f.name)} {value}: {f.metadata.get('refusal', text)}")
    return problems


def check_max_k(max_k: int, heads: str) -> str | None:
    """--max-k is only used with --heads auto, which needs k = 2 or more to choose from."""
    if heads == "auto" and max_k < 2:
        return f"--max-k {max_k}: must be >= 2 with --heads auto"
    return None


def check_heads(heads: str) -> str | None:
    """--heads takes 'auto' or a whole number >= 1 (finetune and clusters alike)."""
    if heads == "auto":
        return None
    try:
        if int(heads) >= 1:
            return None
    except (TypeError, ValueError):
        pass
    return f"--heads {heads}: use 'auto' or a whole number >= 1"
