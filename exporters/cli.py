"""The `export` command, registered onto the core CLI through the `hydra_edge.commands` entry point
(so hydra_edge/ never imports exporters/)."""

from __future__ import annotations

import sys

import typer


def export_command(
    adapter: str = typer.Option(..., "--adapter", help="Adapter folder (the --out of finetune)."),
    out: str = typer.Option(..., "--out", help="New folder for the export."),
    mode: str = typer.Option(
        "adapters",
        "--mode",
        help="adapters: one base model + one adapter file per cluster; "
        "merged: one full ONNX model per cluster; dynamic: router + all heads per token.",
    ),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="fp32; fp16 (for --device cuda); or int4 (MatMulNBits weights, LoRA weights stay float).",
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="cpu, or cuda (needs hydra-edge[export-cuda] and an NVIDIA GPU: the export is validated on the device).",
    ),
) -> None:
    """Export the adapter to ONNX Runtime: per-cluster merged heads, validated against PyTorch."""
    from hydra_edge.exporters.onnx_export import export

    manifest = export(adapter, out, mode, precision, device, log=lambda m: print(m, file=sys.stderr, flush=True))
    checks = manifest["validation"]["checks"].values()
    worst = max(v["max_abs_logit_diff"] for v in checks)
    agreement = min(v.get("decisive_agreement", v["top1_agreement"]) for v in checks)
    print(
        f"exported {len(manifest['clusters'])} clusters ({mode}, {precision}, {device}) to {out}; validation "
        f"passed ({manifest['validation']['criteria']}): worst max |logit diff| {worst:.2e}, "
        f"lowest decisive next-token agreement {agreement:.3f}"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
