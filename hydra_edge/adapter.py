"""Putting HydraLoRA layers into a model, and the adapter directory contract (DESIGN.md §3).

    <out>/adapter_config.json        format version, base model + fingerprint, quantization, r,
                                     alpha, heads, dropout, target_modules, tokenizer reference
    <out>/adapter_model.safetensors  <module>.hydra_A [r, in], .hydra_B [N, out, r],
                                     .hydra_router [N, in]
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from hydra_edge.errors import UserError
from hydra_edge.layers import HydraLoRALinear
from hydra_edge.quant import is_linear4bit

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_KEYS = ("hydra_A", "hydra_B", "hydra_router")

# `--targets` presets: last component of the module name. Llama/Qwen/Mistral/Gemma names, plus
# GPT-NeoX / Falcon / Phi-style fused names so common families work without a comma list.
TARGET_PRESETS = {
    "mlp": ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "dense", "qkv_proj"),
}
TARGET_PRESETS["all"] = TARGET_PRESETS["mlp"] + TARGET_PRESETS["attn"]


def target_names(targets: str) -> tuple[str, ...]:
    """`mlp`, `attn`, `all` or a comma list of module names -> the names to match."""
    if targets in TARGET_PRESETS:
        return TARGET_PRESETS[targets]
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names:
        raise UserError("--targets: empty; use mlp, attn, all or a comma list like q_proj,v_proj")
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_linear4bit(module)


def find_target_modules(model: nn.Module, targets: str) -> list[str]:
    """Dotted names of the linear layers `targets` selects (output head excluded)."""
    names = target_names(targets)
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (leaf in names or name in names) and _is_linear(module) and "lm_head" not in name:
            found.append(name)
    if not found:
        raise UserError(
            f"--targets {targets}: no linear layer of this model matches; "
            "pass a comma list of its module names (e.g. --targets q_proj,v_proj)"
        )
    return found


def inject_hydra_lora(
    model: nn.Module,
    module_names: list[str],
    rank: int,
    alpha: float,
    num_heads: int,
    dropout: float,
    head_init: str = "zero",
) -> dict[str, HydraLoRALinear]:
    """Wraps each named linear layer; freezes everything else. Returns {name: layer}."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base_layer = getattr(parent, child)
        ref = base_layer.weight
        layer = HydraLoRALinear(base_layer, rank, alpha, num_heads, dropout, head_init)
        layer.to(device=ref.device)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def hydra_layers(model: nn.Module) -> dict[str, HydraLoRALinear]:
    """{base-model module name: layer} for every HydraLoRA layer in the model."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, HydraLoRALinear)
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights under the contract's keys, float32 on the CPU."""
    state = {}
    for name, layer in hydra_layers(model).items():
        for key in ADAPTER_KEYS:
            state[f"{name}.{key}"] = getattr(layer, key).detach().float().cpu().contiguous()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies adapter weights into the model's HydraLoRA layers, checking names and shapes."""
    layers = hydra_layers(model)
    expected = {f"{n}.{k}" for n in layers for k in ADAPTER_KEYS}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise UserError(
            f"{source}: adapter modules do not match this base model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example}); "
            "load it onto the base model it was trained on"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for key in ADAPTER_KEYS:
                param = getattr(layer, key)
                value = state[f"{name}.{key}"]
                if value.shape != param.shape:
                    raise UserError(
                        f"{source}: {name}.{key} has shape {list(value.shape)}, this base needs "
                        f"{list(param.shape)}; load it onto the base model it was trained on"
                    )
                param.copy_(value.to(param.dtype))


def base_fingerprint(resolved: str, model: nn.Module, rows_per_tensor: int = 3) -> str:
    """A cheap, device-independent hash of the base checkpoint's weights.

    Read from the checkpoint's safetensors files (names, shapes, dtypes and the first, middle
    and last row of every tensor), so it does not depend on the device or on how the base was
    quantized when loaded: the quantization is recorded beside it and reapplied on load.
    Falls back to the loaded weights when the checkpoint has no safetensors files.
    """
    digest = hashlib.sha256()
    files = _checkpoint_files(resolved)
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), "pt") as f:
                for name in sorted(f.keys()):
                    part = f.get_slice(name)
                    shape = part.get_shape()
                    digest.update(f"{name}|{tuple(shape)}|{part.get_dtype()}|".encode())
                    if not shape:
                        rows = [f.get_tensor(name).reshape(1)]
                    else:
                        picks = sorted({0, shape[0] // 2, shape[0] - 1})[:rows_per_tensor]
                        rows = [part[i : i + 1] for i in picks]
                    for row in rows:
                        digest.update(row.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return "st-" + digest.hexdigest()[:32]
    for name, tensor in sorted(model.state_dict().items()):
        if any(name.endswith(k) for k in ADAPTER_KEYS):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].cpu().contiguous().clone()
        digest.update(f"{name.replace('.base_layer.', '.')}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return "sd-" + digest.hexdigest()[:32]


def _checkpoint_files(resolved: str) -> list[Path]:
    """The *.safetensors files of a local folder or of a Hub id already in the local cache."""
    folder = Path(resolved)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(resolved, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:  # not cached as a snapshot: use the loaded weights instead
            return []
    return sorted(folder.glob("*.safetensors"))


def atomic_write_text(path: Path, text: str) -> None:
    """Writes via a temporary file + rename so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_adapter(model: nn.Module, out_dir: Path, adapter_config: dict) -> None:
    """Writes adapter_config.json and adapter_model.safetensors into out_dir."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, **adapter_config}
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(adapter_state_dict(model), str(tmp), metadata={"format": "hydra-lora"})
    os.replace(tmp, out_dir / WEIGHTS_FILE)
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config, or a UserError naming what is wrong with the folder."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not Path(adapter_dir).is_dir():
        raise UserError(f"--adapter {adapter_dir}: no such folder")
    if not path.is_file() or not (Path(adapter_dir) / WEIGHTS_FILE).is_file():
        raise UserError(
            f"--adapter {adapter_dir}: not a hydra-edge adapter (needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}); point it at the --out folder of a finetune run"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); the adapter folder is damaged") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {config.get('format_version')!r} is not supported by this "
            f"hydra-edge (expects {FORMAT_VERSION}); upgrade hydra-edge or retrain"
        )
    return config


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: cannot read adapter weights ({exc}); the file is damaged") from exc
