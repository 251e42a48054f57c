"""Putting HydraLoRA layers into a model, and its weights file.

<out>/adapter_model.safetensors  <module>.hydra_A [r, in], .hydra_B [N, out, r],
                                 .hydra_router [N, in]
<out>/adapter_config.json        the AdapterConfig (adapter/config.py)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from hydra_edge.adapter.config import ADAPTER_KEYS, CONFIG_FILE, WEIGHTS_FILE, AdapterConfig
from hydra_edge.adapter.layer import HydraLoRALinear
from hydra_edge.errors import UserError
from hydra_edge.files import save_tensors
from hydra_edge.models.quant import is_linear4bit

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
    heads: int,
    dropout: float,
    head_init: str = "zero",
    source: str = "--targets",
    **router_options,
) -> dict[str, HydraLoRALinear]:
    """Wraps each named linear layer; freezes everything else. Returns {name: layer}.
    source names where the module names came from, for the error when one is not there;
    router_options (head_dropout, router_temperature, router_top_k) go to every layer."""
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
        layer = HydraLoRALinear(base_layer, rank, alpha, heads, dropout, head_init, **router_options)
        layer.to(device=ref.device)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def hydra_layers(model: nn.Module) -> dict[str, HydraLoRALinear]:
    """{base-model module name: layer} for every HydraLoRA layer in the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, HydraLoRALinear)}


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
    from hydra_edge.models.gguf import gguf_fingerprint

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


def attach_adapter(model: nn.Module, config: AdapterConfig, weights: dict[str, torch.Tensor], adapter_dir) -> None:
    """A trained adapter on its loaded base: HydraLoRA layers where it was trained (no dropout:
    inference), then its weights."""
    source = str(Path(adapter_dir) / CONFIG_FILE)
    _check_fits_base(model, config, weights, Path(adapter_dir) / WEIGHTS_FILE)
    inject_hydra_lora(
        model,
        config.target_modules,
        config.rank,
        config.alpha,
        config.heads,
        0.0,
        source=source,
        router_temperature=config.router_temperature,
        router_top_k=config.router_top_k,
    )
    load_adapter_state_dict(model, weights, str(adapter_dir))


def _check_fits_base(model: nn.Module, config: AdapterConfig, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Each module's A (r, in) and B (heads, out, r) match the base layer they wrap, checked
    before any layer is built: the layers allocate what the config's r and heads say, so a
    config whose shapes the base does not bear (r = 10^9 beside zero-size tensors) would
    otherwise ask for terabytes. With these checks every allocation is one the file paid for."""
    for name in config.target_modules:
        try:
            base_layer = model.get_submodule(name)
        except AttributeError:
            continue  # inject_hydra_lora names the missing module
        a, b = weights.get(f"{name}.hydra_A"), weights.get(f"{name}.hydra_B")
        wanted_a = [config.rank, getattr(base_layer, "in_features", -1)]
        wanted_b = [config.heads, getattr(base_layer, "out_features", -1), config.rank]
        if a is None or b is None or list(a.shape) != wanted_a or list(b.shape) != wanted_b:
            raise UserError(
                f"{path}: {name} has A {list(a.shape) if a is not None else None}, B "
                f"{list(b.shape) if b is not None else None}; this base's layer needs A {wanted_a}, "
                f"B {wanted_b}; load the adapter onto the base it was trained on, or restore the file"
            )


def save_adapter(model: nn.Module, out_dir: Path, config: AdapterConfig) -> None:
    """Writes adapter_model.safetensors, then adapter_config.json (the folder is complete once
    the config is there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(adapter_state_dict(model), out_dir / WEIGHTS_FILE, metadata={"format": "hydra-lora"})
    config.save(out_dir)


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
