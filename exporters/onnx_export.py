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
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from hydra_edge.adapter_config import AdapterConfig
from hydra_edge.config import run_data_files
from hydra_edge.errors import UserError
from hydra_edge.exporters.merge import (
    check_exportable,
    cluster_gates,
    fold_cluster_into_base,
    hydra_on_plain_base,
    merged_heads,
    save_plain_base,
    write_peft_adapter,
)
from hydra_edge.files import disk_errors, ensure_writable_dir, sha256_of
from hydra_edge.switches import fixed_gates

MANIFEST = "export_manifest.json"
MODES = ("adapters", "merged", "dynamic")
PRECISIONS = ("fp32", "fp16", "int4")
DEVICES = ("cpu", "cuda")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
TOLERANCE = {"fp32": 1e-3}
# fp16 (weights and activations) rounds every op to 11 significant bits: checked like int4 but
# tighter. Measured on the demo adapter: relative error ~0.001-0.003.
FP16_MAX_RELATIVE_ERROR = 0.02
# Measured 0.988-1.0: rounding errors are correlated across the vocabulary (they come through the
# hidden state), so a rare flip past "3 sigma" happens.
FP16_MIN_DECISIVE_AGREEMENT = 0.95
# int4 (MatMulNBits, k-quant, fp32 activations) changes logits by design. It is checked by its
# mean error relative to the spread of the logits, and by whether it picks the same next token
# as the float32 reference wherever that choice is decisive: where the reference's top-1 leads
# its runner-up by more than DECISIVE_SIGMAS noise standard deviations of the (top-1 - top-2)
# difference (σ_diff = √2 · robust std of the position's logit error). A flip there is a > 3σ event,
# so an error; near-ties flip by chance (a random-weight base has almost only near-ties).
# The relative error (mean |diff| / std of the reference logits) of unrelated logits is about
# 1.1 (2/√π·√2), so a broken or mismatched export lands there. int4 rounding measured 0.13-0.15
# on the demo adapter and 0.30 on a random-weight model with Qwen2.5-0.5B's 24 layers (its
# logits are nearly flat, so the same rounding is large next to their spread); 0.5 sits between.
# Block 16 rather than the builder's 32: the base is NF4 (non-uniform levels), and re-rounding it
# onto uniform int4 in blocks of 32 cost the demo adapter 8.8 points of exact-match; blocks of
# 16 cost 1.3. accuracy_level=4 (int8 activations in the MatMulNBits kernels) cost nothing more
# on the demo and decodes the Qwen2.5-0.5B-shaped model at 21.8 tok/s, against 15.3 with float32
# activations (README.md, Export).
# k_quant_mixed is llama.cpp's Q4_K_M recipe in the builder: int8 for the LM head and for the
# most rounding-sensitive MatMuls (attention V/QKV and MLP down in the first and last eighth of
# the layers and every third layer between), int4 for the rest. On Gemma 3 270M (a 262,144-token
# tied head) all-int4 agreed with PyTorch on the next token at 31-35 % of validation positions,
# the int8 head alone 69-71 %, the mix 72-83 %, for 392 MB against 301 MB.
INT4_OPTIONS = ["accuracy_level=4", "algo_config=k_quant_mixed", "block_size=16"]
INT4_MIN_DECISIVE_AGREEMENT = 0.9  # a broken export agrees ~1/vocab of the time
INT4_MAX_RELATIVE_ERROR = 0.5
DECISIVE_SIGMAS = 3.0
# Too few decisive positions make the agreement there vacuous: on Gemma 3 270M, int4's error is
# so large next to the margins that no position was decisive, and the export "passed" while
# top-1 agreed at 31-34 % of positions and held-out exact-match fell from 86.1 % (fp32) to
# 75.9 %. Below this share of decisive positions, the next-token agreement over all positions
# must reach MIN_OVERALL_AGREEMENT instead.
MIN_DECISIVE_SHARE = 0.25
MIN_OVERALL_AGREEMENT = {"int4": 0.6, "fp16": 0.8}
VALIDATION_PROMPTS = 4


def lora_node_names(modules) -> list[str]:
    names = []
    for module in modules:
        parts = module.split(".")
        base = f"/model/layers.{parts[2]}/" + "/".join("attn" if p == "self_attn" else p for p in parts[3:])
        names += [f"{base}/lora_A/MatMul", f"{base}/lora_B/MatMul"]
    return names


def build_onnx(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    device: str,
    cache_dir: Path,
    adapter_path: Path | None = None,
    keep_float: list[str] | None = None,
) -> None:
    """Runs onnxruntime-genai's model builder (through genai_builder.py) on an HF folder (with a PEFT
    LoRA: LoRA branches)."""
    cmd = [
        sys.executable,
        "-m",
        "hydra_edge.exporters.genai_builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        device,
        "-c",
        str(cache_dir),
    ]
    extra = [f"adapter_path={adapter_path}"] if adapter_path is not None else []
    if keep_float:
        extra.append("nodes_to_exclude=" + ",".join(keep_float))
    if precision == "int4":
        extra += INT4_OPTIONS
    if extra:
        cmd += ["--extra_options", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"export: the ONNX model builder failed ({tail[0]})")


# Operators of onnxruntime's contrib set that the model builder writes into the default ONNX
# domain; onnx's own checker has no schema for them there (their com.microsoft siblings, such as
# GroupQueryAttention and MatMulNBits, it skips as a foreign domain).
ORT_OPS_IN_DEFAULT_DOMAIN = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def check_onnx_model(model_dir: Path) -> None:
    """onnx.checker on an exported decoder (graph structure, types, external data inside the
    folder), with the builder's ORT-only default-domain ops checked as the foreign ops they are."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ORT_OPS_IN_DEFAULT_DOMAIN:
            node.domain = "com.microsoft"
    probe = model_dir / ".checker-probe.onnx"  # beside model.onnx, so its external data resolves
    onnx.save(model, str(probe))
    try:
        onnx.checker.check_model(str(probe))
    except onnx.checker.ValidationError as exc:
        raise UserError(
            f"export: onnx.checker rejects {model_dir.name}/model.onnx ({str(exc).splitlines()[0]})"
        ) from exc
    finally:
        probe.unlink()


def open_decoder(model_dir: Path, device: str = "cpu"):
    """(onnxruntime session, genai decoder config) of an exported decoder."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the LoRA inputs are overridable initializers on purpose
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=[PROVIDERS[device]])
    return session, json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]


def check_runtime(device: str) -> None:
    """Refuses a device this onnxruntime install cannot run (export validates on the device)."""
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime as ort

    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    if len(installed) > 1:  # both install the same `onnxruntime` package and overwrite each other
        raise UserError(
            f"--device {device}: both {' and '.join(installed)} are installed; uninstall both, then "
            "install one extra: pip install 'hydra-edge[export]' (CPU) or 'hydra-edge[export-cuda]'"
        )
    if PROVIDERS[device] not in ort.get_available_providers():
        raise UserError(
            f"--device {device}: this onnxruntime offers {', '.join(ort.get_available_providers())}; "
            "a CUDA export is built and validated on an NVIDIA GPU with pip install 'hydra-edge[export-cuda]'"
        )


def run_decoder(session, decoder: dict, input_ids: list[int], extra_feeds: dict | None = None) -> np.ndarray:
    """Full-sequence logits with an empty KV cache. (T, vocab)
    extra_feeds: graph inputs to override (an adapter's LoRA weights)."""
    feeds = {
        "input_ids": np.array([input_ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(input_ids)), dtype=np.int64),
    }
    # An empty cache, (B, kv_heads, capacity, head_size). A sliding-window layer (Gemma 3's local
    # ones) reads a fixed buffer of at least the window, of which the attention mask says none is
    # filled; the others take an empty one and grow it (a fixed buffer there would have to hold
    # the whole sequence).
    window = decoder.get("sliding_window") or {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):  # past_key_values.<layer>.key
            sliding = "layers" not in window or int(spec.name.split(".")[1]) in window["layers"]
            capacity = window.get("window_size", 0) if sliding else 0
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            feeds[spec.name] = np.zeros(
                (1, decoder["num_key_value_heads"], capacity, decoder["head_size"]), dtype=dtype
            )
        elif spec.name == "position_ids":  # graphs without GroupQueryAttention take positions explicitly
            feeds[spec.name] = np.arange(len(input_ids), dtype=np.int64)[None]
    feeds.update(extra_feeds or {})
    try:
        return session.run(["logits"], feeds)[0][0].astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no public base class
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"export: onnxruntime could not run the built model ({first_line[:300]}); "
            "this architecture may not be supported by the installed onnxruntime"
        ) from exc


def onnx_logits(
    model_dir: Path, input_ids: list[int], extra_feeds: dict | None = None, device: str = "cpu"
) -> np.ndarray:
    return run_decoder(*open_decoder(model_dir, device), input_ids, extra_feeds)


def validation_prompts(adapter_dir: Path, count: int = VALIDATION_PROMPTS) -> list[list[dict]]:
    """Fixed conversations: the training run's held-out rows when it had any, else generic prompts."""
    from hydra_edge.data import read_records
    from hydra_edge.files import read_json_object

    config_file = adapter_dir / "run_config.json"
    run_config = (
        read_json_object(config_file, "the run's settings are damaged; retrain") if config_file.is_file() else {}
    )
    model, data, eval_file = run_config.get("model"), run_config.get("data"), run_config.get("eval_data")
    if isinstance(model, str) and isinstance(data, list) and (eval_file is None or isinstance(eval_file, str)):
        eval_file = run_data_files(model, data, eval_file)[1]  # a preset's demo rows when it trained on them
    if isinstance(eval_file, str) and eval_file and Path(eval_file).is_file():
        records = [r for r in read_records(eval_file) if r.messages][:count]
        if records:
            return [r.messages for r in records]  # whole conversations: answer positions are checked too
    return [
        [{"role": "user", "content": text}]
        for text in (
            "Hello! Who are you?",
            "Summarise: the cat sat on the mat.",
            "What is 2 + 2?",
            "Translate 'good morning'.",
        )
    ][:count]


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
    from hydra_edge.inference import prompt_ids

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
            feeds_by_cluster = _build_dynamic(work, plain, adapter_dir, config, precision, device, log)
        else:
            builder = _build_adapters if mode == "adapters" else _build_merged
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


def compare_logits(got: np.ndarray, expected: np.ndarray) -> dict:
    """ONNX vs PyTorch logits over all validation positions. (P, vocab) each."""
    same_top1 = got.argmax(-1) == expected.argmax(-1)  # (P,)
    top2 = np.sort(expected, axis=-1)[:, -2:]  # (P, 2)
    margin = top2[:, 1] - top2[:, 0]  # (P,)
    error = got - expected  # (P, vocab)
    # Robust std (1.4826 · median absolute deviation), so the errors under test do not inflate it.
    spread = 1.4826 * np.median(np.abs(error - np.median(error, axis=-1, keepdims=True)), axis=-1)  # (P,)
    noise = np.sqrt(2.0) * spread  # (P,) std of the top-1 minus top-2 error
    decisive = margin > DECISIVE_SIGMAS * noise
    return {
        "max_abs_logit_diff": float(np.abs(got - expected).max()),
        "top1_agreement": float(same_top1.mean()),
        "positions": int(same_top1.shape[0]),
        "decisive_positions": int(decisive.sum()),
        "decisive_agreement": float(same_top1[decisive].mean()) if decisive.any() else 1.0,
        "relative_error": float(np.abs(got - expected).mean() / max(float(expected.std()), 1e-12)),
    }


def _rounded_limits(precision: str) -> tuple[float, float]:
    """(least decisive agreement, largest relative error) of a precision that rounds by design."""
    if precision == "int4":
        return INT4_MIN_DECISIVE_AGREEMENT, INT4_MAX_RELATIVE_ERROR
    return FP16_MIN_DECISIVE_AGREEMENT, FP16_MAX_RELATIVE_ERROR


def validation_problem(check: dict, precision: str) -> str | None:
    """Why a check fails for this precision, or None."""
    if precision in ("int4", "fp16"):
        min_agreement, max_error = _rounded_limits(precision)
        if check["relative_error"] > max_error:  # unrelated logits: a broken or mismatched export
            return f"mean logit error {check['relative_error']:.3f} of their spread > {max_error}"
        positions = check.get("positions", check["decisive_positions"])
        if check["decisive_positions"] < MIN_DECISIVE_SHARE * positions:
            if check["top1_agreement"] < MIN_OVERALL_AGREEMENT[precision]:
                return (
                    f"only {check['decisive_positions']} of {positions} positions are decisive, and next-token "
                    f"agreement with PyTorch over all of them is {check['top1_agreement']:.3f} < "
                    f"{MIN_OVERALL_AGREEMENT[precision]}: {precision} changes this model's choices; "
                    "export fp32" + (" or fp16" if precision == "int4" else "")
                )
        elif check["decisive_agreement"] < min_agreement:
            return (
                f"next-token agreement with PyTorch where its choice is decisive "
                f"{check['decisive_agreement']:.3f} < {min_agreement} ({check['decisive_positions']} positions)"
            )
        return None
    if check["max_abs_logit_diff"] > TOLERANCE[precision]:
        return (
            f"max |ONNX - PyTorch| logit difference {check['max_abs_logit_diff']:.3g} > tolerance "
            f"{TOLERANCE[precision]:g}"
        )
    return None


def describe_criteria(precision: str) -> str:
    if precision in ("int4", "fp16"):
        min_agreement, max_error = _rounded_limits(precision)
        return (
            f"next-token agreement >= {min_agreement} where PyTorch's top-1 leads by > "
            f"{DECISIVE_SIGMAS:g} sigma of the error (>= {MIN_OVERALL_AGREEMENT[precision]} over all positions "
            f"when under {MIN_DECISIVE_SHARE:.0%} are decisive), mean |diff| / std(logits) <= {max_error}"
        )
    return f"max |logit diff| <= {TOLERANCE[precision]:g}"


def describe_check(check: dict, precision: str) -> str:
    if precision in ("int4", "fp16"):
        return (
            f"next-token agreement {check['decisive_agreement']:.3f} on {check['decisive_positions']} decisive "
            f"positions ({check['top1_agreement']:.3f} on all), relative error {check['relative_error']:.3f}"
        )
    return f"max |logit diff| {check['max_abs_logit_diff']:.2e} <= {TOLERANCE[precision]:g}"


def _build_merged(work: Path, plain: Path, heads_by_cluster, scaling, precision, device, log) -> dict:
    """One full ONNX model per cluster, (A, B̄_c) folded into the weights."""
    for cluster, heads in heads_by_cluster.items():
        log(f"export: cluster {cluster}: folding B̄_c·A into the base and building ONNX ({precision}, {device})")
        folded_dir = work / "tmp" / f"folded_{cluster}"
        _fold(plain, heads, scaling).save_pretrained(folded_dir)
        shutil.copytree(
            plain, folded_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json")
        )
        build_onnx(folded_dir, work / "models" / f"cluster_{cluster}", precision, device, work / "tmp" / "cache")
    return {}


def _build_adapters(work: Path, plain: Path, heads_by_cluster, scaling, precision, device, log) -> dict:
    """One base ONNX model whose LoRA weights are graph inputs, plus one adapter file per cluster.

    The builder (`adapter_path=`) emits MatMul(lora_A) -> MatMul(lora_B, pre-scaled) -> Add per
    module with the weights as initializers; those become graph inputs whose zero-valued
    initializers are the defaults (no adapter active = the base). Returns {cluster: feeds}."""
    import onnxruntime as ort

    first = next(iter(heads_by_cluster))
    log(f"export: building the base ONNX model with LoRA inputs ({precision}, {device})")
    rank = next(iter(heads_by_cluster[first].values()))[0].shape[0]
    template = write_peft_adapter(work / "tmp" / "template", str(plain), rank, float(rank), heads_by_cluster[first])
    model_dir = work / "models" / "base"
    build_onnx(
        plain,
        model_dir,
        precision,
        device,
        work / "tmp" / "cache",
        adapter_path=template,
        keep_float=lora_node_names(heads_by_cluster[first]) if precision == "int4" else None,
    )
    lora_dtypes = _lora_initializers_to_inputs(model_dir)
    (work / "adapters").mkdir()
    feeds_by_cluster = {}
    for cluster, heads in heads_by_cluster.items():
        params = {}
        for module, (a, b) in heads.items():
            params[f"{module}.lora_A.MatMul.weight"] = np.ascontiguousarray(a.numpy().T)  # (in, r)
            params[f"{module}.lora_B.MatMul.weight"] = np.ascontiguousarray((scaling * b).numpy().T)  # (r, out)
        missing = set(lora_dtypes) ^ set(params)
        if missing:
            raise UserError(
                f"export: the builder's LoRA weights do not match the adapter's modules ({sorted(missing)[:2]})"
            )
        params = {k: v.astype(lora_dtypes[k]) for k, v in params.items()}  # float16 in an fp16 export
        adapter = ort.AdapterFormat()
        adapter.set_adapter_version(1)
        adapter.set_model_version(1)
        adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        adapter.export_adapter(str(work / "adapters" / f"cluster_{cluster}.onnx_adapter"))
        feeds_by_cluster[cluster] = params
    return feeds_by_cluster


def _build_dynamic(work: Path, plain: Path, adapter_dir: Path, config: AdapterConfig, precision, device, log) -> dict:
    """One ONNX model that runs the router and all heads per token, exactly as in training.

    The builder's LoRA branch per module, MatMul(x, Aᵀ) -> MatMul(h, B_scaledᵀ), is rewritten to
        g = Softmax(MatMul(x, W_routerᵀ))                  (B, T, N)
        gh = Reshape(Unsqueeze(g, -1) * Unsqueeze(h, -2))    (B, T, N·r)
        delta = MatMul(gh, B_cat)                           B_cat: (N·r, out), scaled by alpha/r
    i.e. the layer's own flattened computation (hydra_edge/layers.py)."""
    import onnx
    from onnx import helper, numpy_helper

    from hydra_edge.adapter import read_adapter_weights

    weights = read_adapter_weights(adapter_dir)
    modules = config.target_modules
    scaling = config.scaling
    log(f"export: building the dynamic ONNX model (router + {config.heads} heads per module; {precision}, {device})")
    template_heads = {m: (weights[f"{m}.hydra_A"].float(), weights[f"{m}.hydra_B"][0].float()) for m in modules}
    template = write_peft_adapter(work / "tmp" / "template", str(plain), config.r, float(config.r), template_heads)
    model_dir = work / "models" / "dynamic"
    build_onnx(
        plain,
        model_dir,
        precision,
        device,
        work / "tmp" / "cache",
        adapter_path=template,
        keep_float=lora_node_names(modules) if precision == "int4" else None,
    )

    path = model_dir / "model.onnx"
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    new_nodes, rewritten = [], 0
    axes = {
        "-1": numpy_helper.from_array(np.array([-1], dtype=np.int64), "hydra_axes_last"),
        "-2": numpy_helper.from_array(np.array([-2], dtype=np.int64), "hydra_axes_second_last"),
        "shape": numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "hydra_shape_flatten_heads"),
    }
    graph.initializer.extend(axes.values())
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "MatMul" or not node.input[1].endswith(".lora_B.MatMul.weight"):
            continue
        module = node.input[1][: -len(".lora_B.MatMul.weight")]
        a_node = producers[node.input[0]]  # MatMul(x, lora_A)
        x, h = a_node.input[0], node.input[0]
        heads = weights[f"{module}.hydra_B"].float()  # (N, out, r)
        n_heads, out_features, rank = heads.shape
        dtype = numpy_helper.to_array(initializers[node.input[1]]).dtype  # the graph's float type
        b_cat = (scaling * heads.permute(0, 2, 1).reshape(n_heads * rank, out_features)).numpy()  # (N·r, out)
        prefix = f"/hydra/{module}"
        router_name, b_name = f"{module}.hydra_router_T", f"{module}.hydra_B_cat"
        router_t = weights[f"{module}.hydra_router"].float().numpy().T  # (in, N)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(router_t, dtype=dtype), router_name))
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(b_cat.astype(dtype), node.input[1]))
        initializers[a_node.input[1]].CopyFrom(
            numpy_helper.from_array(
                np.ascontiguousarray(weights[f"{module}.hydra_A"].float().numpy().T, dtype=dtype), a_node.input[1]
            )
        )
        gate_nodes = [
            helper.make_node("MatMul", [x, router_name], [f"{prefix}/router_logits"], name=f"{prefix}/router/MatMul"),
            helper.make_node(
                "Softmax", [f"{prefix}/router_logits"], [f"{prefix}/gates"], name=f"{prefix}/Softmax", axis=-1
            ),
            helper.make_node(
                "Unsqueeze", [f"{prefix}/gates", "hydra_axes_last"], [f"{prefix}/gates_u"], name=f"{prefix}/UnsqueezeG"
            ),
            helper.make_node(
                "Unsqueeze", [h, "hydra_axes_second_last"], [f"{prefix}/h_u"], name=f"{prefix}/UnsqueezeH"
            ),
            helper.make_node("Mul", [f"{prefix}/gates_u", f"{prefix}/h_u"], [f"{prefix}/gh"], name=f"{prefix}/Mul"),
            helper.make_node(
                "Reshape",
                [f"{prefix}/gh", "hydra_shape_flatten_heads"],
                [f"{prefix}/gh_flat"],
                name=f"{prefix}/Reshape",
            ),
        ]
        new_nodes[-1:] = gate_nodes + [node]
        node.input[0] = f"{prefix}/gh_flat"
        node.input[1] = b_name
        initializers[f"{module}.lora_B.MatMul.weight"].name = b_name
        rewritten += 1
    if rewritten != len(modules):
        raise UserError(f"export: found {rewritten} LoRA branches in the built model, expected {len(modules)}")
    del graph.node[:]
    graph.node.extend(new_nodes)
    (model_dir / "model.onnx.data").unlink()
    onnx.save_model(
        graph_model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return {}


def _lora_initializers_to_inputs(model_dir: Path) -> dict[str, np.dtype]:
    """Turns every LoRA weight initializer into a graph input with a zero default; returns
    {name: dtype} (the adapter files must match it)."""
    import onnx
    from onnx import helper, numpy_helper

    path = model_dir / "model.onnx"
    graph_model = onnx.load(str(path))
    names = {}
    for init in graph_model.graph.initializer:
        if ".lora_A.MatMul.weight" in init.name or ".lora_B.MatMul.weight" in init.name:
            zeros = np.zeros_like(numpy_helper.to_array(init))
            init.CopyFrom(numpy_helper.from_array(zeros, init.name))
            graph_model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(zeros.shape)))
            names[init.name] = zeros.dtype
    (model_dir / "model.onnx.data").unlink()
    onnx.save_model(
        graph_model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return names


def _fold(plain_dir: Path, heads, scaling: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32)
    fold_cluster_into_base(model, heads, scaling)
    return model


def verify_export(folder: str | Path) -> dict:
    """The export's manifest, once every file in the folder is accounted for: each listed file
    is present, inside the folder and unchanged (sha256); no file or link is there that the
    manifest does not list; every file a `genai_config.json` names and every external-data
    reference of every ONNX file stays inside its model folder and is a listed file. Anything
    else is refused with one line, before onnxruntime opens a byte of it."""
    from hydra_edge.files import read_json_object

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--onnx {folder}: no such folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"--onnx {folder}: not a hydra-edge export ({MANIFEST} missing)")
    manifest = read_json_object(manifest_path, "the export is damaged; re-export")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(d, str) for d in files.values()):
        raise UserError(f"{manifest_path}: no 'files' table of sha256 digests; the export is damaged, re-export")
    clusters = manifest.get("clusters")
    if (
        manifest.get("mode") not in MODES
        or manifest.get("device", "cpu") not in DEVICES
        or not isinstance(clusters, list)
        or not clusters
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in clusters)
    ):
        raise UserError(
            f"{manifest_path}: mode, device or clusters missing or invalid; the export is damaged, re-export"
        )
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UserError(f"--onnx {folder}: {rel} is a link; an export holds plain files only, refusing it")
        if path.is_file() and rel != MANIFEST and rel not in files:
            raise UserError(f"--onnx {folder}: {rel} is not in {MANIFEST}; remove it or re-export")
    for rel, digest in files.items():
        path = (folder / rel).resolve()
        if root not in path.parents:
            raise UserError(f"--onnx {folder}: manifest names {rel!r}, outside the export folder; refusing it")
        if not path.is_file():
            raise UserError(f"--onnx {folder}: {rel} is missing; re-export")
        if sha256_of(path) != digest:
            raise UserError(f"--onnx {folder}: {rel} changed since export (sha256 differs); re-export")
    listed = {(folder / rel).resolve() for rel in files}
    for rel in _files_the_export_needs(manifest):
        if (folder / rel).resolve() not in listed:
            raise UserError(f"--onnx {folder}: {rel} is missing from the export; re-export")
    for config_path in sorted(folder.glob("models/*/genai_config.json")):
        for name in _named_files(read_json_object(config_path, "the export is damaged; re-export")):
            _listed_inside(config_path.parent, name, config_path, listed, folder)
    for model_file in sorted(p for p in folder.rglob("*.onnx") if p.is_file()):
        for location in _external_data_locations(model_file, folder):
            _listed_inside(model_file.parent, location, model_file, listed, folder)
    return manifest


def _files_the_export_needs(manifest: dict) -> list[str]:
    """What serving the manifest's mode opens: the router, and each cluster's model or adapter."""
    needed = ["router/clusters.json", "router/clusters.safetensors"]
    models = {"adapters": ["base"], "dynamic": ["dynamic"]}.get(manifest["mode"])
    for name in models or [f"cluster_{c}" for c in manifest["clusters"]]:
        needed += [f"models/{name}/genai_config.json", f"models/{name}/model.onnx"]
    if manifest["mode"] == "adapters":
        needed += [f"adapters/cluster_{c}.onnx_adapter" for c in manifest["clusters"]]
    return needed


def _named_files(config, key: str = "") -> list[str]:
    """Every file name in a genai_config.json: values of `filename` or `*_filename` keys, at any depth."""
    if isinstance(config, dict):
        return [n for k, v in config.items() for n in _named_files(v, k)]
    if isinstance(config, list):
        return [n for v in config for n in _named_files(v, key)]
    if key == "filename" or key.endswith("_filename"):
        return [config]
    return []


def _external_data_locations(model_file: Path, folder: Path) -> list[str]:
    import onnx

    try:
        graph = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: not an ONNX model
        raise UserError(
            f"--onnx {folder}: {model_file.relative_to(folder)} is not a readable ONNX model; re-export"
        ) from exc
    tensors = list(graph.graph.initializer) + [
        n.attribute[0].t
        for n in graph.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")
    ]
    return [entry.value for t in tensors for entry in t.external_data if entry.key == "location"]


def _listed_inside(model_dir: Path, name, named_in: Path, listed: set[Path], folder: Path) -> None:
    """A file named from inside model_dir must stay in model_dir and be one the manifest lists."""
    from hydra_edge.files import path_inside

    where = named_in.relative_to(folder)
    target = path_inside(model_dir, name, where)
    if target not in listed:
        raise UserError(f"--onnx {folder}: {where} names {name!r}, which the manifest does not list; re-export")
