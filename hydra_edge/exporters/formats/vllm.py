"""`--format vllm`: the `peft` export plus serve-vllm.sh, the vLLM command line that serves the base
and every cluster's adapter under the name `hydra-edge serve --upstream` asks for (cluster_<c>)."""

from __future__ import annotations

from pathlib import Path

from hydra_edge.exporters.formats import ExportFormat, peft
from hydra_edge.exporters.vllm_script import SCRIPT, write_vllm_script


def required_files(manifest: dict) -> list[str]:
    return [*peft.required_files(manifest), SCRIPT]


def _with_script(work: Path, entries: dict) -> dict:
    write_vllm_script(work, entries["clusters"], entries["rank"])
    return {**entries, "format": "vllm"}


def export(adapter_dir: Path, out_dir: Path, log) -> dict:
    from hydra_edge.exporters.peft_export import export as export_peft

    return export_peft(adapter_dir, out_dir, log, required_files, extra=_with_script)


def describe(manifest: dict) -> str:
    return f"{peft.describe(manifest)}; serve them with `bash {SCRIPT}` (vLLM, NVIDIA GPU)"


FORMAT = ExportFormat(
    name="vllm",
    summary=f"The peft export plus {SCRIPT}, vLLM serving every cluster's adapter for `serve --upstream`.",
    export=export,
    required_files=required_files,
    describe=describe,
)
