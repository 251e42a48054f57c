"""`--format gguf`: the base and every cluster's adapter for llama.cpp, Ollama and LM Studio,
checked in llama.cpp itself (exporters/gguf_export.py builds it; layout in gguf_layout.py).

The base is your own GGUF file when the run started from one (`auto`/`source`: referenced by
sha256, not copied; `copy` puts it in the export), else written from the dequantized weights the
adapter was trained against (`f16`, `q8_0`, or `q4_k_m` through llama.cpp's quantizer).
"""

from __future__ import annotations

from pathlib import Path

from hydra_edge.exporters.formats import ExportFormat, Option

BASES = ("auto", "source", "copy", "f16", "q8_0", "q4_k_m")


def required_files(manifest: dict) -> list[str]:
    from hydra_edge.exporters.gguf_layout import required_files as files_of

    return files_of(manifest)


def export(adapter_dir: Path, out_dir: Path, log, gguf_base: str = "auto") -> dict:
    from hydra_edge.exporters.gguf_export import export as export_gguf

    return export_gguf(Path(adapter_dir), Path(out_dir), log, required_files, gguf_base)


def describe(manifest: dict) -> str:
    checks = manifest["validation"]["checks"].values()
    worst = min(c["top1_agreement"] for c in checks)
    return (
        f"exported a {manifest['base']['gguf_base']} base and {len(manifest['clusters'])} cluster adapters "
        f"(+{manifest['heads']} head adapters) for llama.cpp and Ollama; validated in llama.cpp "
        f"({manifest['validation']['criteria']}): lowest next-token agreement {worst:.3f}. See README.md in the export"
    )


FORMAT = ExportFormat(
    name="gguf",
    summary="The base and one LoRA per cluster as GGUF, Ollama Modelfiles and a llama.cpp server script.",
    export=export,
    required_files=required_files,
    describe=describe,
    options=(
        Option(
            "gguf_base",
            "auto",
            "The GGUF base: auto (your file if the run started from one, else q8_0), source, copy, f16, q8_0, q4_k_m.",
            BASES,
        ),
    ),
)
