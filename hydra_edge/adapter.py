"""Putting HydraLoRA layers into a model, and the adapter directory contract (DESIGN.md §3).

    <out>/adapter_config.json        format version, base model + fingerprint, quantization, r,
                                     alpha, heads, dropout, target_modules, tokenizer reference
    <out>/adapter_model.safetensors  <module>.hydra_A [r, in], .hydra_B [N, out, r],
                                     .hydra_router [N, in]
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from hydra_edge.errors import UserError
from hydra_edge.files import atomic_write_text, read_json_object, save_tensors
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
    source: str = "--targets",
) -> dict[str, HydraLoRALinear]:
    """Wraps each named linear layer; freezes everything else. Returns {name: layer}.
    source names where the module names came from, for the error when one is not there."""
    for name in module_names:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if found is None or not _is_linear(found):
            raise UserError(
                f"{source}: module {name!r} is not a linear layer of this base model; "
                "load the adapter onto the base it was trained on"
            )
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


@contextmanager
def training_switches_paused(model: nn.Module):
    """A side forward (a probe on a few tokens) with every HydraLoRA layer's training-time
    switches off: pooled gates, router targets and the gate sink describe the batch being
    trained, not the probe, and are restored afterwards."""
    layers = list(hydra_layers(model).values())
    saved = [(layer.pool_groups, layer.router_targets, layer.gate_sink) for layer in layers]
    for layer in layers:
        layer.pool_groups = layer.router_targets = layer.gate_sink = None
    try:
        yield
    finally:
        for layer, (pool_groups, router_targets, gate_sink) in zip(layers, saved):
            layer.pool_groups, layer.router_targets, layer.gate_sink = pool_groups, router_targets, gate_sink


def freeze_uniform_router(model: nn.Module) -> None:
    """Fixes every router at zero, so every token weighs each head 1/N (softmax of zeros). The
    zeros are saved like a trained router, so inference, the gate pass and every export give
    uniform gates with no special case."""
    for layer in hydra_layers(model).values():
        with torch.no_grad():
            layer.hydra_router.zero_()
        layer.hydra_router.requires_grad_(False)


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
    Falls back to the loaded weights when the checkpoint has no safetensors files. A folder
    converted from a GGUF file takes the file's sha256.
    """
    from hydra_edge.gguf_models import gguf_fingerprint

    converted = gguf_fingerprint(resolved)
    if converted:  # a folder converted from a GGUF file is that file
        return converted
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


def save_adapter(model: nn.Module, out_dir: Path, adapter_config: dict) -> None:
    """Writes adapter_config.json and adapter_model.safetensors into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, **adapter_config}
    save_tensors(adapter_state_dict(model), out_dir / WEIGHTS_FILE, metadata={"format": "hydra-lora"})
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config, checked field by field and against the weights file's header
    (shapes only, no tensor read), so a damaged or crafted config is refused before any layer
    is built from it: `heads: 1000000` would otherwise allocate gigabytes first."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not Path(adapter_dir).is_dir():
        raise UserError(f"--adapter {adapter_dir}: no such folder")
    if not path.is_file() or not (Path(adapter_dir) / WEIGHTS_FILE).is_file():
        raise UserError(
            f"--adapter {adapter_dir}: not a hydra-edge adapter (needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}); point it at the --out folder of a finetune run"
        )
    config = read_json_object(path, "the adapter folder is damaged; retrain or restore it")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {config.get('format_version')!r} is not supported by this "
            f"hydra-edge (expects {FORMAT_VERSION}); upgrade hydra-edge or retrain"
        )
    _check_config_fields(config, path)
    _check_weight_shapes(config, Path(adapter_dir) / WEIGHTS_FILE)
    return config


def _is_whole(value, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_config_fields(config: dict, path: Path) -> None:
    from hydra_edge.quant import QUANT_CHOICES

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    rules = {
        "base_model": (lambda v: isinstance(v, str) and bool(v.strip()), "a model name or folder"),
        "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
        "quantization": (lambda v: v in QUANT_CHOICES, f"one of {', '.join(QUANT_CHOICES)}"),
        "r": (_is_whole, "a whole number >= 1"),
        "heads": (_is_whole, "a whole number >= 1"),
        "alpha": (lambda v: number(v) and v > 0, "a number > 0"),
        "target_modules": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(m, str) and m for m in v)
                           and len(set(v)) == len(v), "a non-empty list of distinct module names"),
    }
    for key, (ok, expected) in rules.items():
        if key not in config:
            raise UserError(f"{path}: '{key}' is missing; the adapter folder is damaged, retrain or restore it")
        if not ok(config[key]):
            raise UserError(f"{path}: '{key}' is {config[key]!r}, expected {expected}; the adapter folder is damaged")
    if config.get("dtype", "bf16") not in ("bf16", "fp32"):
        raise UserError(f"{path}: 'dtype' is {config['dtype']!r}, expected bf16 or fp32; the adapter folder is damaged")


def _check_weight_shapes(config: dict, weights_path: Path) -> None:
    """Every target module has hydra_A (r, in), hydra_B (heads, out, r) and hydra_router
    (heads, in) in the weights file, and nothing else is there. Reads the header only
    (safetensors checks that it covers the file exactly, so a truncated file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), "pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # SafetensorError and friends: damaged or truncated file
        raise UserError(f"{weights_path}: cannot read adapter weights ({exc}); the file is damaged") from exc
    r, heads = config["r"], config["heads"]
    expected = {f"{m}.{k}" for m in config["target_modules"] for k in ADAPTER_KEYS}
    if set(shapes) != expected:
        odd = sorted(set(shapes) ^ expected)[0]
        raise UserError(f"{weights_path}: its tensors do not match adapter_config.json's target_modules "
                        f"(e.g. {odd}); the adapter folder is damaged")
    for module in config["target_modules"]:
        a, b, router = (shapes[f"{module}.{k}"] for k in ADAPTER_KEYS)
        fits = (len(a) == 2 and len(b) == 3 and len(router) == 2 and a[0] == r and b[0] == heads and b[2] == r
                and router == [heads, a[1]])
        if not fits:
            raise UserError(
                f"{weights_path}: {module} has A {a}, B {b}, router {router}, but adapter_config.json says "
                f"r={r}, heads={heads}; the adapter folder is damaged"
            )


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: cannot read adapter weights ({exc}); the file is damaged") from exc
    bad = next((k for k, v in weights.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{path}: {bad} holds non-finite or non-float values; the file is damaged")
    return weights
