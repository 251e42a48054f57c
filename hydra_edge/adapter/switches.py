"""Switches on every HydraLoRA layer of a model, as context managers that always restore.

A HydraLoRALinear (layer.py) has five runtime switches that change what its forward computes:
`fixed_gates` (constant gates instead of the router's: a cluster's export, or zeros for the base
alone), `gate_sink` (collect the gates it computed), `router_targets` (add the router-supervision
loss), `balance_tokens` (add the balance-and-certainty loss) and `pool_groups` (pooled gates).
Setting them by hand on every layer and resetting them on every path out, errors included, was
repeated across the package; these managers do it once.

The training switches (`router_targets`, `router_balance`, `pooled_gates`) must enclose the
backward pass, not only the forward: gradient checkpointing replays the forward during backward, and the replay has
to compute what the first pass computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hydra_edge.adapter.inject import hydra_layers
from hydra_edge.adapter.layer import HydraLoRALinear

# Per-module gates: {module name: (N,) float32}, one (N,) for every module, or None (the router).
Gates = dict[str, torch.Tensor] | torch.Tensor | None


@contextmanager
def _switched(model: nn.Module, attribute: str, value_of: Callable[[str, HydraLoRALinear], object]) -> Iterator[dict]:
    """Sets `attribute` of every HydraLoRA layer to value_of(name, layer); restores the old values."""
    layers = hydra_layers(model)
    saved = {name: getattr(layer, attribute) for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            setattr(layer, attribute, value_of(name, layer))
        yield layers
    finally:
        for name, layer in layers.items():
            setattr(layer, attribute, saved[name])


def _gates_of(gates: Gates, name: str) -> torch.Tensor | None:
    return gates.get(name) if isinstance(gates, dict) else gates


@contextmanager
def fixed_gates(model: nn.Module, gates: Gates) -> Iterator[None]:
    """Every token uses these gates instead of the router's: with a cluster's mean gates ḡ_c this
    is the per-cluster merge an export ships (B̄_c = Σ_i ḡ_{c,i} B_i), computed in PyTorch. None
    keeps (or brings back) the per-token router."""
    with _switched(model, "fixed_gates", lambda name, layer: _gates_of(gates, name)):
        yield


@contextmanager
def heads_disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone: every layer's gates are zero, so the branch adds exactly nothing
    (y = W0·x), for "compare with the base model"."""
    with _switched(model, "fixed_gates", lambda name, layer: torch.zeros(layer.heads)):
        yield


@contextmanager
def capture_gates(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """{module name: list}: each forward appends the float32 gates (B, T, N) it computed."""
    sinks: dict[str, list[torch.Tensor]] = {}

    def sink(name: str, layer: HydraLoRALinear) -> list:
        return sinks.setdefault(name, [])

    with _switched(model, "gate_sink", sink):
        yield sinks


@contextmanager
def router_targets(model: nn.Module, cluster_ids: torch.Tensor | None) -> Iterator[list[tuple[torch.Tensor, int]]]:
    """Router supervision toward each token's cluster ((B, T) long, -1 = none; None: off). Yields
    the list every layer appends its (summed -log gate, token count) to; keep the block open
    through backward (what a checkpointing replay appends is discarded with the list)."""
    collected: list[tuple[torch.Tensor, int]] = []
    with _switched(model, "router_losses", lambda name, layer: collected):
        with _switched(model, "router_targets", lambda name, layer: cluster_ids):
            yield collected


@contextmanager
def router_balance(model: nn.Module, real_tokens: torch.Tensor | None) -> Iterator[list[torch.Tensor]]:
    """The balance-and-certainty loss over the real tokens ((B, T) bool; None: off). Yields the
    list every layer appends its loss to; keep the block open through backward, like
    router_targets."""
    collected: list[torch.Tensor] = []
    with _switched(model, "balance_losses", lambda name, layer: collected):
        with _switched(model, "balance_tokens", lambda name, layer: real_tokens):
            yield collected


@contextmanager
def pooled_gates(model: nn.Module, groups: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """Every token gets the mean gates of its group (training/losses.pooling_groups; None: off). Keep the
    block open through backward, like router_targets."""
    with _switched(model, "pool_groups", lambda name, layer: groups):
        yield


@contextmanager
def training_switches_paused(model: nn.Module) -> Iterator[None]:
    """A side forward (a probe on a few tokens) with the training-time switches off: pooled gates,
    router targets and the gate sink describe the batch being trained, not the probe."""
    with (
        _switched(model, "pool_groups", lambda name, layer: None),
        _switched(model, "router_targets", lambda name, layer: None),
        _switched(model, "balance_tokens", lambda name, layer: None),
        _switched(model, "gate_sink", lambda name, layer: None),
    ):
        yield
