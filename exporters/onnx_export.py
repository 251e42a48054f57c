"""`hydra-edge export`: a trained adapter -> ONNX Runtime models, validated against PyTorch.

Merged mode (this module's first mode): for each cluster c, W <- W_deq + (alpha/r) · B̄_c · A is
folded into a float32 copy of the dequantized base, and onnxruntime-genai's model builder turns
that folder into an ONNX decoder (KV cache, fused attention). The request router ships as plain
arrays. Every export is validated: the ONNX logits must match the PyTorch model with the same
per-cluster gates within a stated tolerance, or the export fails (and leaves nothing behind).

    <out>/export_manifest.json      mode, precision, base + fingerprint, clusters, validation,
                                    sha256 of every file
    <out>/router/                   clusters.json + clusters.safetensors (numpy-only routing)
    <out>/models/cluster_<c>/       genai_config.json, model.onnx, model.onnx.data, tokenizer
    <out>/peft/base/                the dequantized base as a float32 HF folder
    <out>/peft/cluster_<c>/         LoRA (A, B̄_c) in PEFT format, for PEFT / vLLM / TGI
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from hydra_edge.errors import UserError
from hydra_edge.exporters.merge import (
    check_exportable, cluster_gates, fold_cluster_into_base, hydra_on_plain_base, merged_heads, save_plain_base,
    write_peft_adapter,
)

MANIFEST = "export_manifest.json"
MODES = ("merged",)
PRECISIONS = ("fp32",)
TOLERANCE = {"fp32": 1e-3}
VALIDATION_PROMPTS = 4


def build_onnx(hf_dir: Path, out_dir: Path, precision: str, device: str, cache_dir: Path) -> None:
    """Runs onnxruntime-genai's model builder on an HF folder."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", device, "-c", str(cache_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"export: the ONNX model builder failed ({tail[0]})")


def onnx_logits(model_dir: Path, input_ids: list[int]) -> np.ndarray:
    """Full-sequence logits of an exported decoder, run with an empty KV cache. (T, vocab)"""
    import onnxruntime as ort

    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([input_ids], dtype=np.int64),
             "attention_mask": np.ones((1, len(input_ids)), dtype=np.int64)}
    empty_cache = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = empty_cache
    return session.run(["logits"], feeds)[0][0]


def validation_prompts(adapter_dir: Path, count: int = VALIDATION_PROMPTS) -> list[list[dict]]:
    """Fixed prompts: the training run's held-out rows when it had any, else generic ones."""
    from hydra_edge.data import read_records

    run_config = json.loads((adapter_dir / "run_config.json").read_text()) if (adapter_dir / "run_config.json").is_file() else {}
    eval_file = run_config.get("eval_data")
    if not eval_file and run_config.get("model") == "tiny" and not run_config.get("data"):
        from hydra_edge.tiny import DEMO_EVAL

        eval_file = str(DEMO_EVAL)
    if eval_file and Path(eval_file).is_file():
        records = [r for r in read_records(eval_file) if r.messages][:count]
        if records:
            return [r.messages[:-1] if r.reference_answer is not None else r.messages for r in records]
    return [[{"role": "user", "content": text}] for text in
            ("Hello! Who are you?", "Summarise: the cat sat on the mat.", "What is 2 + 2?", "Translate 'good morning'.")][:count]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export(adapter_dir: str | Path, out_dir: str | Path, mode: str = "merged", precision: str = "fp32",
           device: str = "cpu", log=print) -> dict:
    """Builds, validates and writes the export; returns the manifest."""
    from hydra_edge.inference import prompt_ids

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if mode not in MODES:
        raise UserError(f"--mode {mode}: this version exports {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: this version exports {', '.join(PRECISIONS)}")
    if device != "cpu":
        raise UserError(f"--device {device}: this version exports for cpu")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir}: not empty; choose a new folder (nothing was overwritten)")
    config = check_exportable(adapter_dir)
    scaling = config["alpha"] / config["r"]
    heads_by_cluster = merged_heads(adapter_dir)
    gates_by_cluster = cluster_gates(adapter_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        log("export: writing the dequantized base")
        plain = save_plain_base(config, work / "peft" / "base")
        prompts = validation_prompts(adapter_dir)
        validation = {}
        for cluster, heads in heads_by_cluster.items():
            log(f"export: cluster {cluster}: folding B̄_c·A into the base and building ONNX ({precision}, {device})")
            reference, tokenizer = hydra_on_plain_base(plain, adapter_dir, gates_by_cluster[cluster])
            folded_dir = work / "tmp" / f"folded_{cluster}"
            folded = _fold(plain, heads, scaling)
            folded.save_pretrained(folded_dir)
            tokenizer.save_pretrained(folded_dir)
            model_dir = work / "models" / f"cluster_{cluster}"
            build_onnx(folded_dir, model_dir, precision, device, work / "tmp" / "cache")
            worst = 0.0
            for messages in prompts:
                ids = prompt_ids(tokenizer, messages)
                with torch.no_grad():
                    expected = reference(input_ids=torch.tensor([ids])).logits[0].float().numpy()
                worst = max(worst, float(np.abs(onnx_logits(model_dir, ids) - expected).max()))
            validation[str(cluster)] = {"max_abs_logit_diff": worst, "prompts": len(prompts)}
            if worst > TOLERANCE[precision]:
                raise UserError(
                    f"export: validation failed for cluster {cluster}: max |ONNX - PyTorch| logit difference "
                    f"{worst:.3g} > tolerance {TOLERANCE[precision]:g}; nothing was written to {out_dir}"
                )
            log(f"export: cluster {cluster} validated (max |logit diff| {worst:.2e} <= {TOLERANCE[precision]:g})")
            write_peft_adapter(work / "peft" / f"cluster_{cluster}", "../base", config["r"], config["alpha"], heads)
        shutil.rmtree(work / "tmp")
        (work / "router").mkdir()
        for name in ("clusters.json", "clusters.safetensors"):
            shutil.copy2(adapter_dir / name, work / "router" / name)
        manifest = {
            "format_version": 1, "mode": mode, "precision": precision, "device": device,
            "adapter": str(adapter_dir.resolve()),
            "base": {"model": config["base_model"], "fingerprint": config["base_fingerprint"],
                     "weights": f"dequantized {config['quantization']}" if config["quantization"] != "none" else "as trained"},
            "clusters": sorted(int(c) for c in heads_by_cluster), "heads": config["heads"], "r": config["r"],
            "alpha": config["alpha"], "validation": {"tolerance": TOLERANCE[precision], "per_cluster": validation},
        }
        manifest["files"] = {str(p.relative_to(work)): _sha256(p) for p in sorted(work.rglob("*")) if p.is_file()}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_export(work)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _fold(plain_dir: Path, heads, scaling: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32)
    fold_cluster_into_base(model, heads, scaling)
    return model


def verify_export(folder: str | Path) -> dict:
    """Refuses an export whose files changed or whose ONNX external data points outside it."""
    import onnx

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"--onnx {folder}: not a hydra-edge export ({MANIFEST} missing)")
    manifest = json.loads(manifest_path.read_text())
    root = folder.resolve()
    for rel, digest in manifest["files"].items():
        path = (folder / rel).resolve()
        if root not in path.parents:
            raise UserError(f"--onnx {folder}: manifest names {rel!r}, outside the export folder; refusing it")
        if not path.is_file():
            raise UserError(f"--onnx {folder}: {rel} is missing; re-export")
        if _sha256(path) != digest:
            raise UserError(f"--onnx {folder}: {rel} changed since export (sha256 differs); re-export")
    for model_file in folder.glob("models/*/model.onnx"):
        graph = onnx.load(str(model_file), load_external_data=False)
        for tensor in graph.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    target = (model_file.parent / entry.value).resolve()
                    if model_file.parent.resolve() not in target.parents:
                        raise UserError(
                            f"--onnx {folder}: {model_file.relative_to(folder)} reads external data from "
                            f"{entry.value!r}, outside its folder; refusing it"
                        )
    return manifest
