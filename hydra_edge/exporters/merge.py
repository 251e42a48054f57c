"""Per-cluster merge of the heads, on the base the adapter was trained against.

For cluster c with mean gates ḡ_c (per module), the heads collapse into one LoRA of rank r:

    Σ_i ḡ_{c,i} · B_i · A  =  B̄_c · A        B̄_c = Σ_i ḡ_{c,i} · B_i

The base is the *dequantized* NF4/FP4 weights (what training multiplied by), not the original
checkpoint; it is written once as an ordinary float32 Hugging Face folder so that the ONNX
builder and other runtimes (PEFT, vLLM, TGI) can load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.gates import cluster_gates
from hydra_edge.adapter.inject import hydra_layers, read_adapter_weights
from hydra_edge.files import save_tensors
from hydra_edge.models.quant import dequantized_weight, is_linear4bit


def merged_heads(model: nn.Module, gates_by_cluster: dict) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{cluster: {module: (A (r, in), B̄_c (out, r))}}, float32: each layer's own merge
    (HydraLoRALinear.merged_head) with the cluster's mean gates {cluster: {module: (N,)}}."""
    layers = hydra_layers(model)
    return {
        cluster: {
            name: (layer.hydra_A.detach().float(), layer.merged_head(gates[name]).detach())
            for name, layer in layers.items()
        }
        for cluster, gates in gates_by_cluster.items()
    }


def dequantize_in_place(model: nn.Module) -> nn.Module:
    """Replaces every bitsandbytes 4-bit layer by an nn.Linear holding its dequantized weight,
    and makes the whole model float32. Works on a model with or without HydraLoRA layers."""
    for name, module in list(model.named_modules()):
        if not is_linear4bit(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(dequantized_weight(module).float())
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for flag in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    model.hf_quantizer = None
    return model.float()


def save_plain_base(adapter_config: AdapterConfig, out_dir: Path) -> Path:
    """Writes the base the adapter was trained against, dequantized to float32, as an HF folder."""
    from hydra_edge.models.base import load_base

    base = load_base(
        adapter_config.base_model,
        quant=adapter_config.quant,
        device="cpu",
        dtype=adapter_config.dtype,
        chat_template=adapter_config.chat_template,  # saved with the tokenizer: every export renders as training did
    )
    dequantize_in_place(base.model)
    base.model.save_pretrained(out_dir)
    base.tokenizer.save_pretrained(out_dir)
    return out_dir


def hydra_on_plain_base(plain_dir: Path, adapter_dir: Path):
    """(model, tokenizer): the float32 plain base with the HydraLoRA adapter, routing per token;
    inside `switches.fixed_gates(model, ḡ_c)` it computes cluster c's merged model."""
    from hydra_edge.adapter.inject import attach_adapter
    from hydra_edge.models.base import load_base

    config = AdapterConfig.load(adapter_dir)
    base = load_base(str(plain_dir), quant="none", device="cpu", dtype="fp32")
    attach_adapter(base.model, config, read_adapter_weights(adapter_dir), adapter_dir)
    return base.model.eval(), base.tokenizer


def pinned_logits(model: nn.Module, gates, prompts: list[list[int]]) -> np.ndarray:
    """float32 logits of each prompt's token ids, concatenated, with every layer's gates fixed to
    `gates` (a cluster's mean gates: its merged model; None: the per-token router). (ΣT, vocab)"""
    from hydra_edge.adapter.switches import fixed_gates

    with torch.no_grad(), fixed_gates(model, gates):
        return np.concatenate([model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts])


def fold_cluster_into_base(
    model: nn.Module, heads: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float
) -> None:
    """W <- W + scaling · B̄_c · A for every adapted module of a float32 plain base (merged mode)."""
    with torch.no_grad():
        for module, (a, b) in heads.items():
            layer = model.get_submodule(module)
            layer.weight += scaling * (b @ a)  # (out, r) @ (r, in) -> (out, in)


def write_peft_adapter(
    out_dir: Path, base_reference: str, r: int, alpha: float, heads: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Path:
    """One cluster as a PEFT LoRA folder (A and B̄_c; PEFT applies the alpha/r scaling)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in heads.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_tensors(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_reference,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(heads),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def check_exportable(adapter_dir: Path) -> AdapterConfig:
    """The adapter's config, once every file an export reads is known to be sound: the config
    and weights, the router (an export must not ship one that cannot route) and the gates."""
    from hydra_edge.clusters.fit import load_clusters

    config = AdapterConfig.load(adapter_dir)
    read_adapter_weights(adapter_dir)
    load_clusters(adapter_dir, expected_k=config.heads)
    cluster_gates(adapter_dir)
    return config
