"""Export formats as plug-ins: every module in this package that defines `FORMAT` is one.

`hydra-edge export --format NAME` and the web UI's Export tab are built from this registry: a
format's options become flags and form fields, its `export` builds, validates and writes the
folder (through `exporters/folder.py`, so every format gets the same empty-folder check, atomic
rename and signed manifest), and `required_files` says what a reader must find in it. Adding a
format is adding one module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hydra_edge.errors import UserError

DEFAULT_FORMAT = "onnx"


@dataclass(frozen=True)
class Option:
    """One setting of a format: `--NAME` on the command line, a choice in the UI."""

    name: str
    default: str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class ExportFormat:
    name: str  # --format NAME; the manifest's "format"
    summary: str  # one line for --help and the UI
    # (adapter_dir, out_dir, log, **options) -> the manifest written
    export: Callable[..., dict]
    # manifest -> the files (relative paths) the folder must hold to be used
    required_files: Callable[[dict], list[str]]
    # manifest -> one line telling the user what was written and how it validated
    describe: Callable[[dict], str]
    options: tuple[Option, ...] = field(default_factory=tuple)

    def settings(self, given: dict[str, str | None]) -> dict[str, str]:
        """This format's options with defaults filled in; an option of another format, or a
        value outside an option's choices, is one line naming the flag."""
        own = {option.name: option for option in self.options}
        for name, value in given.items():
            if value is not None and name not in own:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} is not an option of --format {self.name}; leave it out")
        chosen = {}
        for name, option in own.items():
            value = given.get(name)
            value = option.default if value is None else str(value)
            if option.choices and value not in option.choices:
                raise UserError(f"{option.flag} {value}: --format {self.name} takes {', '.join(option.choices)}")
            chosen[name] = value
        return chosen


def formats() -> dict[str, ExportFormat]:
    """Every format in this package, the default first."""
    found = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != DEFAULT_FORMAT, m.name)):
        fmt = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FORMAT", None)
        if isinstance(fmt, ExportFormat):
            found[fmt.name] = fmt
    return found


def all_options() -> dict[str, list[tuple[ExportFormat, Option]]]:
    """Option name -> the formats that declare it (formats may share an option's name)."""
    options: dict[str, list[tuple[ExportFormat, Option]]] = {}
    for fmt in formats().values():
        for option in fmt.options:
            options.setdefault(option.name, []).append((fmt, option))
    return options


def get_format(name: str) -> ExportFormat:
    known = formats()
    if name not in known:
        raise UserError(f"--format {name}: this version exports {', '.join(known)}")
    return known[name]


def run_export(adapter: str | Path, out: str | Path, format_name: str, options: dict, log=print) -> dict:
    """Exports with one format; returns the manifest it wrote."""
    fmt = get_format(format_name)
    return fmt.export(Path(adapter), Path(out), log, **fmt.settings(options))
