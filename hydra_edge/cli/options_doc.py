"""The CLI documented from itself: a table of the commands and, for every command, a table of its
options (flag, default, help), read from the Click commands Typer builds, so the documentation
holds exactly what `--help` does. scripts/generate_docs.py writes them into README.md and
docs/cli.md; tests/test_docs_generated.py fails when they drift.

`finetune`'s flags default to "not given" (so a YAML file or a preset can fill them); its table
shows the defaults of `FinetuneConfig` instead, the values a run gets when nothing sets them.
"""

from __future__ import annotations

import dataclasses

import typer

from hydra_edge.cli.app import _register_plugins, app
from hydra_edge.training.config import FinetuneConfig


def _commands() -> dict:
    """Command path ("data validate") -> its Click command, in the order `--help` lists them.
    (Typer ships its own copy of Click, so commands are told apart by what they have.)"""
    _register_plugins()
    root = typer.main.get_command(app)
    found = {}
    context = typer.Context(root)
    for name in root.list_commands(context):
        command = root.get_command(context, name)
        if hasattr(command, "list_commands"):  # a group: `data validate`, `data preview`
            for sub in command.list_commands(context):
                found[f"{name} {sub}"] = command.get_command(context, sub)
        else:
            found[name] = command
    return found


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(command: str, param) -> str:
    if command == "finetune" and param.name in FINETUNE_DEFAULTS:
        value = FINETUNE_DEFAULTS[param.name]
    else:
        value = param.default
    if value is None or value == () or value == [] or param.required:
        return "required" if param.required else ""
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


FINETUNE_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                     for f in dataclasses.fields(FinetuneConfig)}  # fmt: skip


def _flags(param) -> str:
    names = [*param.opts, *getattr(param, "secondary_opts", [])]
    return " / ".join(f"`{n}`" for n in names)


def option_table(command: str, cmd) -> str:
    rows = ["| option | default | what it does |", "| --- | --- | --- |"]
    for param in cmd.params:
        if param.param_type_name == "option" and param.name != "help":
            rows.append(f"| {_flags(param)} | {_default(command, param)} | {_cell(param.help or '')} |")
    return "\n".join(rows) + "\n"


def preset_table() -> str:
    """Each preset's settings (training/presets/*.yaml); a setting no preset changes is left out."""
    from hydra_edge.training.config import PRESET_DEFAULTS

    keys = list(dict.fromkeys(k for values in PRESET_DEFAULTS.values() for k in values))
    rows = ["| preset | " + " | ".join(f"`--{k.replace('_', '-')}`" for k in keys) + " |"]
    rows.append("| --- |" + " --- |" * len(keys))
    for name, values in PRESET_DEFAULTS.items():
        cells = [f"{values[k]:g}" if isinstance(values.get(k), float) else str(values.get(k, "")) for k in keys]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def option_tables() -> dict[str, str]:
    """Generated part name -> markdown: `commands`, and `options:<command>` for every command
    (a subcommand's name joined with a dash: options:data-validate)."""
    commands = _commands()
    parts = {"commands": command_table(commands), "presets": preset_table()}
    for name, cmd in commands.items():
        parts[f"options:{name.replace(' ', '-')}"] = option_table(name, cmd)
    return parts


def command_table(commands: dict) -> str:
    rows = ["| command | what it does |", "| --- | --- |"]
    for name, cmd in commands.items():
        summary = (cmd.help or "").strip().split("\n\n")[0]
        rows.append(f"| `hydra-edge {name}` | {_cell(summary)} |")
    return "\n".join(rows) + "\n"
