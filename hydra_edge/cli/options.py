"""A command's options from a settings dataclass (hydra_edge/settings.py): one option per field,
with its type (a Literal lists its choices), its help, a --flag/--no-flag pair for a boolean and a
repeatable option for a list. Every command is built this way, so a setting's name, default, help
and bounds are written once, in its field, and the README's option tables (cli/options_doc.py)
come from the same place."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable

import typer

from hydra_edge.errors import UserError
from hydra_edge.settings import flag


def _option_type(hint):
    """The type Typer should parse: a Literal or a list (a repeatable option) as is, else the
    non-None member of `X | None`."""
    if typing.get_origin(hint) in (typing.Literal, list):
        return hint
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def options_of(settings_class: type, unset_defaults: bool = False) -> list[inspect.Parameter]:
    """`settings_class`'s fields as Typer options. With unset_defaults, every default is None so
    a flag the user did not give leaves a YAML file's or a preset's value alone (finetune)."""
    hints = typing.get_type_hints(settings_class)
    params = []
    for f in dataclasses.fields(settings_class):
        if f.metadata.get("cli") is False:
            continue
        kind = _option_type(hints[f.name])
        if "flag" in f.metadata:  # a name of its own (`as_json` is --json): a plain switch for a boolean
            names = (f.metadata["flag"],)
        else:
            names = (f"{flag(f.name)}/--no-{flag(f.name)[2:]}",) if kind is bool else (flag(f.name),)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if unset_defaults:
            default, show = None, False
        elif required:
            default, show = ..., False
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            show = default not in (None, [], "")
        envvar = {"envvar": f.metadata["envvar"], "show_envvar": True} if "envvar" in f.metadata else {}
        option = typer.Option(default, *names, help=f.metadata["help"], show_default=show, **envvar)
        annotation = kind | None if unset_defaults or default is None else kind
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def options_signature(*settings_classes: type) -> inspect.Signature:
    """The options of a command that takes the fields of several settings classes, in order."""
    return inspect.Signature([p for cls in settings_classes for p in options_of(cls)])


def from_options(settings_class: type, values: dict):
    """An instance of `settings_class` from a command's options (other classes' are left alone)."""
    return settings_class(**{f.name: values[f.name] for f in dataclasses.fields(settings_class) if f.name in values})


def settings_command(settings_class: type, action: Callable, doc: str | None = None):
    """A Typer command whose options are `settings_class`'s fields: the values build one settings
    object (its checks turn a bad value into one line) and `action(settings)` runs."""

    def command(**values) -> None:
        try:
            settings = settings_class(**values)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        action(settings)

    params = options_of(settings_class)
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc or action.__doc__
    command.__name__ = action.__name__
    return command
