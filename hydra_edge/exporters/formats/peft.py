"""`--format peft`: the base the adapter was trained against (dequantized to a float32 Hugging Face
folder) and one PEFT LoRA folder per cluster holding (A, B̄_c), for PEFT, vLLM, TGI or any runtime
that loads LoRA adapters by name; each validated from its written file (exporters/peft_export.py).

    <out>/peft/base/            the dequantized base (config, safetensors, tokenizer)
    <out>/peft/cluster_<c>/     adapter_config.json + adapter_model.safetensors
    <out>/router/               the request router (cluster_<c> is the adapter a request needs)
"""

from __future__ import annotations

from pathlib import Path

from hydra_edge.exporters.formats import ExportFormat


def required_files(manifest: dict) -> list[str]:
    needed = ["router/clusters.json", "router/clusters.safetensors", "peft/base/config.json"]
    for c in manifest["clusters"]:
        needed += [f"peft/cluster_{c}/adapter_config.json", f"peft/cluster_{c}/adapter_model.safetensors"]
    return needed


def export(adapter_dir: Path, out_dir: Path, log) -> dict:
    from hydra_edge.exporters.peft_export import export as export_peft

    return export_peft(adapter_dir, out_dir, log, required_files)


def describe(manifest: dict) -> str:
    worst = max(v["max_abs_logit_diff"] for v in manifest["validation"]["checks"].values())
    return (
        f"exported the base and {len(manifest['clusters'])} PEFT LoRA adapters (peft/cluster_<c>); validation "
        f"passed ({manifest['validation']['criteria']}): worst max |logit diff| {worst:.2e}"
    )


FORMAT = ExportFormat(
    name="peft",
    summary="The dequantized base and one PEFT LoRA adapter per cluster (PEFT, vLLM, TGI).",
    export=export,
    required_files=required_files,
    describe=describe,
)
