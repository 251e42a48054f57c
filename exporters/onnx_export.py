"""`hydra-edge export`: a trained adapter -> ONNX Runtime models, validated against PyTorch.

For each cluster c the heads collapse into one LoRA, B̄_c = Σ_i ḡ_{c,i} B_i, on a float32 copy of
the dequantized base, and onnxruntime-genai's model builder makes the ONNX decoder (KV cache,
fused attention):

- `adapters` (default): one base model whose LoRA weights are graph inputs, plus one
  `.onnx_adapter` file per cluster that onnxruntime-genai activates per request; the base is
  stored once.
- `merged`: one full ONNX model per cluster with (A, B̄_c) folded into the weights.
- `dynamic`: one ONNX model that computes the per-token router and all heads, exactly as in
  training (no per-cluster approximation).

The request router ships as plain arrays. Every export is validated: the ONNX logits must match
the PyTorch model with the same per-cluster gates within a stated tolerance, or the export fails
and leaves nothing behind.

    <out>/export_manifest.json      mode, precision, base + fingerprint, clusters, validation,
                                    sha256 of every file
    <out>/router/                   clusters.json + clusters.safetensors (numpy-only routing)
    <out>/models/base/              adapters mode: the decoder with LoRA inputs
    <out>/adapters/cluster_<c>.onnx_adapter
    <out>/models/cluster_<c>/       merged mode: genai_config.json, model.onnx, model.onnx.data
    <out>/models/dynamic/           dynamic mode: the decoder with the router and heads inside
    <out>/peft/base/                the dequantized base as a float32 HF folder
    <out>/peft/cluster_<c>/         LoRA (A, B̄_c) in PEFT format, for PEFT / vLLM / TGI
    <out>/serve-vllm.sh             vLLM serving peft/ (base + one adapter per cluster), for
                                    `hydra-edge serve --upstream`
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from hydra_edge.adapter_config import AdapterConfig
from hydra_edge.errors import UserError
from hydra_edge.exporters.builders import build_adapters, build_dynamic, build_merged
from hydra_edge.exporters.manifest import DEVICES, MANIFEST, MODES, PRECISIONS, verify_export
from hydra_edge.exporters.merge import (
    check_exportable,
    hydra_on_plain_base,
    merged_heads,
    save_plain_base,
    write_peft_adapter,
)
from hydra_edge.exporters.runtime import check_onnx_model, check_runtime, onnx_logits
from hydra_edge.exporters.validation import (
    compare_logits,
    describe_check,
    describe_criteria,
    validation_problem,
    validation_prompts,
)
from hydra_edge.exporters.vllm_script import write_vllm_script
from hydra_edge.files import disk_errors, ensure_writable_dir, sha256_of
from hydra_edge.gates import cluster_gates
from hydra_edge.switches import fixed_gates


def export(
    adapter_dir: str | Path,
    out_dir: str | Path,
    mode: str = "adapters",
    precision: str = "fp32",
    device: str = "cpu",
    log=print,
) -> dict:
    """Builds, validates and writes the export; returns the manifest."""

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if mode not in MODES:
        raise UserError(f"--mode {mode}: this version exports {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: this version exports {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise UserError(f"--device {device}: use one of {', '.join(DEVICES)}")
    check_runtime(device)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir}: not empty (or not a folder); choose a new folder (nothing was overwritten)")
    config = check_exportable(adapter_dir)
    ensure_writable_dir(out_dir.parent, "--out")
    with disk_errors(out_dir):  # safetensors' write errors (the base, PEFT folders) as OSError
        return _build_validate_and_write(adapter_dir, out_dir, mode, precision, device, config, log)


def _build_validate_and_write(
    adapter_dir: Path, out_dir: Path, mode: str, precision: str, device: str, config: AdapterConfig, log
) -> dict:
    """Everything export() writes, in a temporary folder renamed into place at the end."""
    from hydra_edge.data import prompt_ids

    scaling = config.scaling
    heads_by_cluster = merged_heads(adapter_dir)
    gates_by_cluster = cluster_gates(adapter_dir)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        log("export: writing the dequantized base")
        plain = save_plain_base(config, work / "peft" / "base")
        prompts = validation_prompts(adapter_dir)
        reference, tokenizer = hydra_on_plain_base(plain, adapter_dir)
        if mode == "dynamic":
            feeds_by_cluster = build_dynamic(work, plain, adapter_dir, config, precision, device, log)
        else:
            builder = build_adapters if mode == "adapters" else build_merged
            feeds_by_cluster = builder(work, plain, heads_by_cluster, scaling, precision, device, log)
        # What each exported model must reproduce: the dynamic model itself, or each cluster's
        # merged computation (the same adapter with every layer's gates fixed to ḡ_c).
        targets = [("dynamic", None)] if mode == "dynamic" else [(c, gates_by_cluster[c]) for c in heads_by_cluster]
        for model_dir in sorted((work / "models").iterdir()):
            check_onnx_model(model_dir)
        validation = {}
        for target, gates in targets:
            model_dir = work / "models" / {"adapters": "base", "dynamic": "dynamic"}.get(mode, f"cluster_{target}")
            got, expected = [], []
            for messages in prompts:
                ids = prompt_ids(tokenizer, messages)
                with torch.no_grad(), fixed_gates(reference, gates):
                    expected.append(reference(input_ids=torch.tensor([ids])).logits[0].float().numpy())
                got.append(onnx_logits(model_dir, ids, feeds_by_cluster.get(target), device))
            check = compare_logits(np.concatenate(got), np.concatenate(expected))
            validation[str(target)] = {**check, "prompts": len(prompts)}
            problem = validation_problem(check, precision)
            name = target if target == "dynamic" else f"cluster {target}"
            if problem:
                raise UserError(f"export: validation failed for {name}: {problem}; nothing was written to {out_dir}")
            log(f"export: {name} validated ({describe_check(check, precision)})")
        for cluster, heads in heads_by_cluster.items():
            write_peft_adapter(work / "peft" / f"cluster_{cluster}", "../base", config.r, config.alpha, heads)
        write_vllm_script(work, sorted(heads_by_cluster), config.r)
        shutil.rmtree(work / "tmp")
        (work / "router").mkdir()
        for name in ("clusters.json", "clusters.safetensors"):
            shutil.copy2(adapter_dir / name, work / "router" / name)
        manifest = {
            "format_version": 1,
            "mode": mode,
            "precision": precision,
            "device": device,
            "adapter": str(adapter_dir.resolve()),
            "base": {
                "model": config.base_model,
                "fingerprint": config.base_fingerprint,
                "weights": f"dequantized {config.quantization}" if config.quantization != "none" else "as trained",
            },
            "clusters": sorted(int(c) for c in heads_by_cluster),
            "heads": config.heads,
            "r": config.r,
            "alpha": config.alpha,
            "validation": {"criteria": describe_criteria(precision), "checks": validation, "onnx_checker": "passed"},
        }
        manifest["files"] = {str(p.relative_to(work)): sha256_of(p) for p in sorted(work.rglob("*")) if p.is_file()}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_export(work)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest
