"""`--format onnx` (the default): ONNX Runtime models per cluster, validated against PyTorch, for
`chat --onnx`, `eval --onnx`, `serve --onnx` and the web UI (exporters/onnx_export.py builds them).

Light at import, like every format module: `hydra-edge --help` lists the formats and their options
without loading torch; the builders load when an export runs.
"""

from __future__ import annotations

from pathlib import Path

from hydra_edge.choices import ONNX_DEVICES, ONNX_MODES, ONNX_PRECISIONS
from hydra_edge.errors import UserError
from hydra_edge.exporters.formats import ExportFormat, Option
from hydra_edge.exporters.manifest import verify_export


def export(
    adapter_dir: str | Path,
    out_dir: str | Path,
    mode: str = "adapters",
    precision: str = "fp32",
    device: str = "cpu",
    log=print,
) -> dict:
    """Builds, validates and writes an ONNX export; returns the manifest."""
    from hydra_edge.exporters.folder import building, prepare, seal
    from hydra_edge.exporters.onnx_export import build_and_validate
    from hydra_edge.exporters.runtime import check_runtime

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    FORMAT.settings({"mode": mode, "precision": precision, "device": device})  # its options' choices
    check_runtime(device)
    config = prepare(adapter_dir, out_dir)
    with building(out_dir) as work:
        manifest = build_and_validate(work, adapter_dir, out_dir, mode, precision, device, config, log)
        return seal(work, out_dir, adapter_dir, manifest, required_files)


def required_files(manifest: dict) -> list[str]:
    """What serving the manifest's mode opens: the router, and each cluster's model or adapter."""
    kind = manifest.get("format", "onnx")  # exports without the field are ONNX exports
    if kind != "onnx":
        raise UserError(f"export_manifest.json: a {kind} export, not an ONNX one; export with --format onnx")
    if manifest.get("mode") not in ONNX_MODES or manifest.get("device", "cpu") not in ONNX_DEVICES:
        raise UserError("export_manifest.json: mode or device missing or invalid; the export is damaged, re-export")
    needed = ["router/clusters.json", "router/clusters.safetensors"]
    models = {"adapters": ["base"], "dynamic": ["dynamic"]}.get(manifest["mode"])
    for name in models or [f"cluster_{c}" for c in manifest["clusters"]]:
        needed += [f"models/{name}/genai_config.json", f"models/{name}/model.onnx"]
    if manifest["mode"] == "adapters":
        needed += [f"adapters/cluster_{c}.onnx_adapter" for c in manifest["clusters"]]
    return needed


def verify_onnx_export(folder: str | Path) -> dict:
    """An ONNX export's manifest once every file is accounted for (manifest.verify_export) and the
    folder holds what its mode serves."""
    return verify_export(folder, required_files)


def describe(manifest: dict) -> str:
    checks = manifest["validation"]["checks"].values()
    worst = max(v["max_abs_logit_diff"] for v in checks)
    agreement = min(v.get("decisive_agreement", v["top1_agreement"]) for v in checks)
    return (
        f"exported {len(manifest['clusters'])} clusters ({manifest['mode']}, {manifest['precision']}, "
        f"{manifest['device']}); validation passed ({manifest['validation']['criteria']}): worst max |logit diff| "
        f"{worst:.2e}, lowest decisive next-token agreement {agreement:.3f}"
    )


FORMAT = ExportFormat(
    name="onnx",
    summary="ONNX Runtime models (onnxruntime-genai) per cluster, validated against PyTorch.",
    export=lambda adapter_dir, out_dir, log, **options: export(adapter_dir, out_dir, log=log, **options),
    required_files=required_files,
    describe=describe,
    options=(
        Option(
            "mode",
            "adapters",
            "adapters: one base model + one adapter file per cluster; merged: one full ONNX model per cluster; "
            "dynamic: router + all heads per token.",
            ONNX_MODES,
        ),
        Option(
            "precision",
            "fp32",
            "fp32; fp16 (for --device cuda); or int4 (MatMulNBits weights, LoRA weights stay float).",
            ONNX_PRECISIONS,
        ),
        Option(
            "device",
            "cpu",
            "cpu, or cuda (needs hydra-edge[export-cuda] and an NVIDIA GPU: the export is validated on the device).",
            ONNX_DEVICES,
        ),
    ),
)
