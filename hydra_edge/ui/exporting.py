"""Exporting from the UI: a `hydra-edge export` subprocess in the job slot, and what it wrote
(the manifest's validation and the files). No gradio here.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.exporters.formats import DEFAULT_FORMAT, get_format
from hydra_edge.ui.jobs import Job, JobManager
from hydra_edge.ui.training import adapter_base
from hydra_edge.ui.workspace import EXPORTS_DIR, Workspace

LOGS_DIR = "logs"


def default_export_name(adapter: str, format_name: str, options: dict[str, str]) -> str:
    """<run>-<format>[-<each option's value>], e.g. run-onnx-adapters-fp32-cpu or run-peft."""
    run = Path((adapter or "run").strip().rstrip("/")).name or "run"
    return "-".join([run, format_name, *options.values()])


def build_command(
    ws: Workspace, adapter: str, name: str, format_name: str = DEFAULT_FORMAT, options: dict | None = None
) -> tuple[list[str], Path]:
    """The `hydra-edge export` argument list and its folder; the format's own rules check the options."""
    folder = ws.resolve(adapter, "adapter", kind="dir")
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"adapter {ws.rel(folder)}: not a finished run (adapter_config.json missing)")
    adapter_base(ws, folder)  # the base export loads must be inside the workspace too
    fmt = get_format(format_name)
    chosen = fmt.settings({k: v for k, v in (options or {}).items() if k in {o.name for o in fmt.options}})
    name = (name or "").strip() or default_export_name(ws.rel(folder), fmt.name, chosen)
    out = ws.new_folder(EXPORTS_DIR, name, "export name")
    argv = ["export", "--adapter", ws.rel(folder), "--out", ws.rel(out), "--format", fmt.name]
    for option in fmt.options:
        argv += [option.flag, chosen[option.name]]
    return argv, out


def start_export(
    ws: Workspace, jobs: JobManager, adapter: str, name: str, format_name: str, options: dict[str, str]
) -> Job:
    argv, out = build_command(ws, adapter, name, format_name, options)

    def out_is_free() -> None:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"export name {out.name}: {ws.rel(out)} already exists; choose another name")

    return jobs.start("export", out.name, out, argv, ws.root / LOGS_DIR / f"export-{out.name}.log", check=out_is_free)


def export_result(ws: Workspace, folder: str | Path) -> dict:
    """An export's manifest summarised: format, its settings, clusters, validation per check, files."""
    folder = ws.resolve(folder, "export", kind="dir")
    manifest_path = folder / "export_manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"export {ws.rel(folder)}: no export_manifest.json; not a finished export")
    manifest = json.loads(manifest_path.read_text())
    checks = [
        {"check": name if name == "dynamic" else f"cluster {name}", **values}
        for name, values in manifest["validation"]["checks"].items()
    ]
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files.append({"file": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size})
    return {
        "export": ws.rel(folder),
        "format": manifest.get("format", "onnx"),
        "mode": manifest.get("mode"),
        "precision": manifest.get("precision"),
        "clusters": manifest["clusters"],
        "base": manifest["base"]["model"],
        "criteria": manifest["validation"]["criteria"],
        "checks": checks,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
    }


def export_status(ws: Workspace, jobs: JobManager) -> dict:
    job = jobs.last.get("export")
    if job is None:
        return {"state": "idle", "export": None, "message": "No export in this session yet."}
    code = job.process.poll()
    status = {
        "export": ws.rel(job.out),
        "pid": job.process.pid,
        "returncode": code,
        "command": job.command,
        "log": job.log_tail(),
    }
    if code is None:
        return {**status, "state": "running", "message": f"Exporting to {ws.rel(job.out)}… (building and validating)"}
    if code == 0:
        result = export_result(ws, job.out)
        return {
            **status,
            "state": "finished",
            "result": result,
            "message": f"Exported to {result['export']}: validation passed ({result['criteria']}).",
        }
    return {**status, "state": "failed", "message": f"Export to {ws.rel(job.out)} failed: {job.error_message()}"}
