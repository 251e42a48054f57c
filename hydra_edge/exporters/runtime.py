"""ONNX Runtime sessions on an exported decoder: the checker, the provider check, and the
full-sequence logits that validation and `eval --onnx` compare with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hydra_edge.errors import UserError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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
