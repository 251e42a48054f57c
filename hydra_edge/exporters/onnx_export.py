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

The request router ships as plain arrays. Every export is validated: the ONNX logits must
match the PyTorch model with the same per-cluster gates within a stated tolerance, or the export
fails and leaves nothing behind. `hydra-edge export --format onnx` (formats/onnx.py) runs this in an export folder
(folder.py); the PEFT folders and the vLLM script are the `peft` and `vllm` formats.

    <out>/export_manifest.json      format, mode, precision, base + fingerprint, clusters,
                                    validation, sha256 of every file
    <out>/router/                   clusters.json + clusters.safetensors (numpy-only routing)
    <out>/models/base/              adapters mode: the decoder with LoRA inputs
    <out>/adapters/cluster_<c>.onnx_adapter
    <out>/models/cluster_<c>/       merged mode: genai_config.json, model.onnx, model.onnx.data
    <out>/models/dynamic/           dynamic mode: the decoder with the router and heads inside
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.gates import cluster_gates
from hydra_edge.errors import UserError
from hydra_edge.exporters.builders import build_adapters, build_dynamic, build_merged
from hydra_edge.exporters.folder import base_entry
from hydra_edge.exporters.merge import hydra_on_plain_base, merged_heads, pinned_logits, save_plain_base
from hydra_edge.exporters.runtime import check_onnx_model, onnx_logits
from hydra_edge.exporters.validation import (
    compare_logits,
    describe_check,
    describe_criteria,
    validation_problem,
    validation_prompts,
)


def build_and_validate(
    work: Path, adapter_dir: Path, out_dir: Path, mode: str, precision: str, device: str, config: AdapterConfig, log
) -> dict:
    """The ONNX models in work/models (and adapters in work/adapters), each validated against
    PyTorch; returns the manifest's entries."""
    gates_by_cluster = cluster_gates(adapter_dir)
    log("export: writing the dequantized base")
    plain = save_plain_base(config, work / "plain")
    reference, tokenizer = hydra_on_plain_base(plain, adapter_dir)
    heads_by_cluster = merged_heads(reference, gates_by_cluster)
    if mode == "dynamic":
        feeds_by_cluster = build_dynamic(work, plain, adapter_dir, config, precision, device, log)
    else:
        builder = build_adapters if mode == "adapters" else build_merged
        feeds_by_cluster = builder(work, plain, heads_by_cluster, config.scaling, precision, device, log)
    for model_dir in sorted((work / "models").iterdir()):
        check_onnx_model(model_dir)
    # What each exported model must reproduce: the dynamic model itself, or each cluster's
    # merged computation (the same adapter with every layer's gates fixed to ḡ_c).
    targets = [("dynamic", None)] if mode == "dynamic" else [(c, gates_by_cluster[c]) for c in heads_by_cluster]
    prompts = validation_prompts(adapter_dir)
    validation = {}
    for target, gates in targets:
        model_dir = work / "models" / {"adapters": "base", "dynamic": "dynamic"}.get(mode, f"cluster_{target}")
        check = _validate(reference, tokenizer, gates, prompts, model_dir, feeds_by_cluster.get(target), device)
        validation[str(target)] = {**check, "prompts": len(prompts)}
        problem = validation_problem(check, precision)
        name = target if target == "dynamic" else f"cluster {target}"
        if problem:
            raise UserError(f"export: validation failed for {name}: {problem}; nothing was written to {out_dir}")
        log(f"export: {name} validated ({describe_check(check, precision)})")
    shutil.rmtree(work / "tmp")
    shutil.rmtree(work / "plain")
    return {
        "format": "onnx",
        "mode": mode,
        "precision": precision,
        "device": device,
        "base": base_entry(config),
        "clusters": sorted(int(c) for c in heads_by_cluster),
        "heads": config.heads,
        "rank": config.rank,
        "alpha": config.alpha,
        "validation": {"criteria": describe_criteria(precision), "checks": validation, "onnx_checker": "passed"},
    }


def _validate(reference, tokenizer, gates, prompts, model_dir: Path, feeds, device: str) -> dict:
    """The exported model's logits against PyTorch's (the reference with these gates fixed)."""
    from hydra_edge.data.records import prompt_ids

    ids = [prompt_ids(tokenizer, messages) for messages in prompts]
    got = np.concatenate([onnx_logits(model_dir, one, feeds, device) for one in ids])
    return compare_logits(got, pinned_logits(reference, gates, ids))
