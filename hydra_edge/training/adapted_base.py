"""The base model with HydraLoRA layers in it, built as a run's settings say, and what the
adapter's config records of how it was built (so eval, chat and export rebuild the same model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra_edge.adapter.inject import base_fingerprint, find_target_modules, freeze_uniform_router, inject_hydra_lora
from hydra_edge.training.config import FinetuneConfig


@dataclass
class AdaptedBase:
    """The loaded base with HydraLoRA in it, and how it was built."""

    base: Any  # models.base.BaseModel
    heads: int
    mixed_precision: str  # what accelerate trains in: "no" or "bf16"
    dtype: str  # what the base was loaded in: "fp32" or "bf16"
    fingerprint: str
    modules: list[str]  # the adapted modules' names
    top_k: int  # the router's top-k as trained (0: every head)
    trainable: int  # trainable parameters


def build_adapted_base(
    config: FinetuneConfig, heads: int, chat_template: str | None, mixed_precision: str
) -> AdaptedBase:
    """Loads the base in the precision the run trains in and puts HydraLoRA layers (heads
    heads, seeded by --seed) into the modules --targets names."""
    import torch

    from hydra_edge.models.base import load_base

    dtype = "fp32" if mixed_precision == "no" else "bf16"
    base = load_base(
        config.model,
        quant=config.quant,
        gradient_checkpointing=config.gradient_checkpointing,
        dtype=dtype,
        chat_template=chat_template,
    )
    fingerprint = base_fingerprint(base.resolved, base.model)
    modules = find_target_modules(base.model, config.targets)
    torch.manual_seed(config.seed)
    top_k = config.router_top_k if config.router_top_k < heads else 0  # k >= N: every head anyway
    inject_hydra_lora(
        base.model,
        modules,
        config.rank,
        config.alpha,
        heads,
        config.dropout,
        config.head_init,
        head_dropout=config.head_dropout,
        router_temperature=config.router_temperature,
        router_top_k=top_k,
    )
    if config.router == "uniform":
        freeze_uniform_router(base.model)
    trainable = sum(p.numel() for p in base.model.parameters() if p.requires_grad)
    return AdaptedBase(base, heads, mixed_precision, dtype, fingerprint, modules, top_k, trainable)
