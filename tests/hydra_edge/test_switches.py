"""The layer switches as context managers: what each one changes, and that it always restores."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hydra_edge.adapter.layer import HydraLoRALinear
from hydra_edge.adapter.switches import (
    capture_gates,
    fixed_gates,
    heads_disabled,
    pooled_gates,
    router_targets,
    training_switches_paused,
)


def two_layer_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        HydraLoRALinear(nn.Linear(16, 16), rank=4, alpha=8, heads=3, head_init="random"),
        HydraLoRALinear(nn.Linear(16, 8), rank=4, alpha=8, heads=3, head_init="random"),
    )
    with torch.no_grad():
        for layer in model:
            layer.hydra_B.normal_()  # heads that clearly change the output
    return model


def test_heads_disabled_gives_the_base_layer_exactly_and_restores_the_gates():
    torch.manual_seed(0)
    model = nn.Sequential(HydraLoRALinear(nn.Linear(16, 8), rank=4, alpha=8, heads=3, head_init="random"))
    layer = model[0]
    with torch.no_grad():
        layer.hydra_B.normal_()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        adapted = model(x)
        with heads_disabled(model):
            base = model(x)
        again = model(x)
    torch.testing.assert_close(base, layer.base_layer(x), rtol=0, atol=0)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(again, adapted)
    assert layer.fixed_gates is None


def test_fixed_gates_per_module_and_for_all_and_restored_on_error():
    model = two_layer_model()
    x = torch.randn(2, 5, 16)
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad():
        routed = model(x)
        with fixed_gates(model, {"0": one_hot, "1": one_hot}):
            per_module = model(x)
        with fixed_gates(model, one_hot):
            for_all = model(x)
        with pytest.raises(RuntimeError), fixed_gates(model, one_hot):
            raise RuntimeError("a failure inside the block")
    torch.testing.assert_close(per_module, for_all)
    assert not torch.allclose(per_module, routed)
    assert all(layer.fixed_gates is None for layer in model)
    with fixed_gates(model, {"0": one_hot}):  # a module left out keeps its router
        assert model[0].fixed_gates is one_hot and model[1].fixed_gates is None


def test_capture_gates_collects_each_forward_and_stops_after():
    model = two_layer_model()
    with torch.no_grad(), capture_gates(model) as sinks:
        model(torch.randn(2, 5, 16))
        model(torch.randn(1, 3, 16))
    assert list(sinks) == ["0", "1"]
    assert [tuple(g.shape) for g in sinks["0"]] == [(2, 5, 3), (1, 3, 3)]
    torch.testing.assert_close(sinks["1"][0].sum(-1), torch.ones(2, 5))
    assert all(layer.gate_sink is None for layer in model)


def test_router_targets_collect_losses_and_pausing_hides_them():
    model = two_layer_model()
    targets = torch.tensor([[0, 1, -1]])
    with router_targets(model, targets) as collected:
        model(torch.randn(1, 3, 16))
        assert [count for _, count in collected] == [2, 2]  # one entry per layer, -1 not counted
        with training_switches_paused(model):
            model(torch.randn(1, 3, 16))
        assert len(collected) == 2
        assert all(layer.router_targets is targets for layer in model)
    assert all(layer.router_targets is None for layer in model)


def test_training_switches_hold_through_a_checkpointed_backward():
    """Gradient checkpointing replays the forward in backward: a switch reset before backward
    would change what the replay computes. Inside the block the gradients equal those of the
    same step without checkpointing."""
    x = torch.randn(2, 4, 16)
    groups = (torch.tensor([[0, 0, 1, 1], [2, 2, 2, -1]]), torch.ones(2, 4, dtype=torch.bool))

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        model = two_layer_model()
        with pooled_gates(model, groups), router_targets(model, torch.zeros(2, 4, dtype=torch.long)) as collected:
            out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
            router_loss = sum(n for n, _ in collected)
            (out.square().mean() + router_loss).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
