"""The `export` command, registered onto the core CLI through the `hydra_edge.commands` entry point
(so the core never imports the exporters). Its options are built from the format registry
(exporters/formats/): `--format` picks one, and each format's own options are flags of the
command, refused with one line when given to another format."""

from __future__ import annotations

import inspect
import sys
import typing

import typer

from hydra_edge.exporters.formats import DEFAULT_FORMAT, all_options, formats, run_export


def export_parameters() -> list[inspect.Parameter]:
    """--adapter, --out, --format, then every format's options (default None: "not given")."""
    known = formats()
    listing = " ".join(f"{name}: {fmt.summary}" for name, fmt in known.items())
    params = [
        ("adapter", str, typer.Option(..., "--adapter", help="Adapter folder (the --out of finetune).")),
        ("out", str, typer.Option(..., "--out", help="New folder for the export.")),
        ("format", typing.Literal[tuple(known)], typer.Option(DEFAULT_FORMAT, "--format", help=listing)),
    ]
    for name, owners in all_options().items():
        fmt, option = owners[0]
        which = ", ".join(f.name for f, _ in owners)
        choices = "|".join(dict.fromkeys(c for _, o in owners for c in o.choices))
        help_text = f"[--format {which}] {option.help} Default: {option.default}."
        # A plain string: the format checks its own choices (ExportFormat.settings), in one line
        # naming the flag and the format, the same from the CLI, the UI and the API.
        option_flag = typer.Option(None, option.flag, help=help_text, show_default=False, metavar=f"<{choices}>")
        params.append((name, str | None, option_flag))
    return [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in params]


def export_command(**values) -> None:
    """Export the adapter: ONNX Runtime (per-cluster merged heads), GGUF for llama.cpp and Ollama,
    PEFT folders or a vLLM server script, each validated against PyTorch."""
    adapter, out, name = values.pop("adapter"), values.pop("out"), values.pop("format")
    manifest = run_export(adapter, out, name, values, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{formats()[name].describe(manifest)}; written to {out}")


def register(app: typer.Typer) -> None:
    params = export_parameters()
    export_command.__signature__ = inspect.Signature(params)
    export_command.__annotations__ = {p.name: p.annotation for p in params}
    app.command("export")(export_command)
