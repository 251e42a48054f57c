"""Settings dataclasses that are also a command's options, so that each setting is written once.

A field made by `setting()` carries its default, its help, an environment variable it may be read
from, and its bounds; `options_from()` gives a command the fields as its Typer options (flag,
default and help from the field), `from_options()` turns what the command received back into the
dataclass, and `check_bounds()` refuses a value out of bounds in one line naming its flag, whoever
built the settings (the command line or code).

`finetune` has machinery of the same kind (training/config.py, cli/app.py), shaped by its own
needs: there every flag defaults to None, so that a YAML file or a preset fills what the command
line left out, and a bound reads "must be >= 1". `serve` has no YAML file, shows its real defaults
in --help and words its refusals as it always has, so it cannot reuse that without changing it;
this module is the small generic version the server's commands use.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import typer

from hydra_edge.errors import UserError


def setting(default, help: str, *, envvar: str | None = None, ge=None, le=None, refusal: str | None = None):
    """A dataclass field that is also the option --NAME (NAME with dashes for underscores).
    envvar: read the value from this variable when the flag is not given (shown in --help).
    ge, le: inclusive bounds, checked by check_bounds; refusal: what to say when they fail
    (default: "must be at least GE" / "at most LE")."""
    metadata = {"help": help, "envvar": envvar, "ge": ge, "le": le, "refusal": refusal}
    return dataclasses.field(default=default, metadata=metadata)


def flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _shown(value) -> str:
    """A value as a refusal quotes it: whole numbers as given, others in their shortest form."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_bounds(settings) -> None:
    """Refuses the first field (in order) whose value is outside its bounds."""
    for field in dataclasses.fields(settings):
        value, ge, le = getattr(settings, field.name), field.metadata.get("ge"), field.metadata.get("le")
        if value is None or ((ge is None or value >= ge) and (le is None or value <= le)):
            continue
        limits = []
        if ge is not None:
            limits.append(f"at least {ge}")
        if le is not None:
            limits.append(f"at most {le}")
        refusal = field.metadata.get("refusal") or "must be " + " and ".join(limits)
        raise UserError(f"{flag(field)} {_shown(value)}: {refusal}")


def _parameter(field: dataclasses.Field, annotation) -> inspect.Parameter:
    envvar = field.metadata.get("envvar")
    extras = {"envvar": envvar, "show_envvar": True} if envvar else {}
    option = typer.Option(field.default, flag(field), help=field.metadata["help"], **extras)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def options_signature(*classes: type) -> inspect.Signature:
    """The options of a command that takes the fields of `classes` (in order) as keywords."""
    params = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        params += [_parameter(field, hints[field.name]) for field in dataclasses.fields(cls)]
    return inspect.Signature(params)


def options_from(*classes: type):
    """Decorates `command(**options)` to take the options of `classes`, as Typer reads them (a
    signature, and the annotations Typer resolves its types from)."""

    def decorate(command):
        command.__signature__ = options_signature(*classes)
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate


def from_options(cls: type, options: dict):
    """An instance of `cls` from a command's options (those of other classes are left alone)."""
    return cls(**{field.name: options[field.name] for field in dataclasses.fields(cls)})
