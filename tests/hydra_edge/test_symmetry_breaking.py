"""The levers that let HydraLoRA's heads differ: random centred heads, per-head dropout, router
temperature, top-k routing, the balance-and-certainty loss and the annealed router losses."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hydra_edge.adapter.layer import HydraLoRALinear, top_k_gates
from hydra_edge.adapter.switches import router_balance

IN, OUT, R = 32, 48, 4


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def test_random_heads_start_distinct_centred_and_exactly_at_the_base(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=4, head_init="random")
    heads = layer.hydra_B.detach()  # (N, out, r)
    assert_close(heads.sum(0), torch.zeros(OUT, R), atol=1e-7, rtol=0)
    cosine = nn.functional.cosine_similarity(heads[0].flatten(), heads[1].flatten(), dim=0)
    assert abs(float(cosine)) < 0.5  # independent draws, not one head repeated
    # R-LoRA's stable scale: std r^¼ / (8·√out), not the 1e-2-of-kaiming of a token init.
    assert float(heads.std()) == pytest.approx(R**0.25 / (8 * math.sqrt(OUT)), rel=0.15)
    assert torch.equal(layer.hydra_router, torch.zeros_like(layer.hydra_router))
    x = torch.randn(2, 5, IN)
    assert_close(layer(x), linear(x), atol=1e-6, rtol=0)  # uniform gates mix the heads to zero


def test_one_random_head_starts_at_zero_like_lora(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=1, head_init="random")
    assert torch.equal(layer.hydra_B, torch.zeros_like(layer.hydra_B))


def test_random_heads_give_the_router_a_gradient_from_the_first_step(linear):
    """Zero heads give the router nothing to learn from; distinct heads do."""
    x = torch.randn(2, 5, IN)
    for init, has_gradient in (("zero", False), ("random", True)):
        layer = HydraLoRALinear(linear, R, alpha=16, heads=3, head_init=init)
        (layer(x) - linear(x).detach() - 1).pow(2).sum().backward()
        assert (float(layer.hydra_router.grad.abs().max()) > 0) == has_gradient, init


def test_per_head_dropout_gives_equal_heads_different_gradients(linear):
    x = torch.randn(4, 6, IN)
    grads = {}
    for head_dropout in (0.0, 0.3):
        torch.manual_seed(1)
        layer = HydraLoRALinear(linear, R, alpha=16, heads=3, head_dropout=head_dropout)
        with torch.no_grad():
            layer.hydra_router.zero_()  # uniform gates: only dropout can tell the heads apart
            layer.hydra_B.copy_(torch.randn(OUT, R).expand(3, OUT, R))
        layer.train()
        layer(x).pow(2).sum().backward()
        grads[head_dropout] = layer.hydra_B.grad
    assert_close(grads[0.0][0], grads[0.0][1])  # the symmetry: one gradient for every head
    assert not torch.allclose(grads[0.3][0], grads[0.3][1])
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # no dropout at inference


def test_router_temperature_divides_the_logits(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=3, router_temperature=0.5)
    x = torch.randn(2, 5, IN)
    assert_close(layer.gates(x), torch.softmax(x @ layer.hydra_router.T / 0.5, dim=-1))


def test_top_k_routes_forward_to_k_heads_and_trains_every_router_row(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=4, router_top_k=2)
    x = torch.randn(2, 5, IN)
    gates = layer.gates(x)  # (B, T, N)
    assert ((gates > 0).sum(-1) == 2).all()
    assert_close(gates.sum(-1), torch.ones(2, 5))
    soft = torch.softmax(x @ layer.hydra_router.T, dim=-1)
    kept = soft.topk(2, dim=-1).values
    assert_close(gates.topk(2, dim=-1).values, kept / kept.sum(-1, keepdim=True))
    (gates * torch.randn_like(gates)).sum().backward()
    assert (layer.hydra_router.grad.abs().sum(-1) > 0).all()  # straight-through: every head's row learns


def test_top_k_gates_keep_the_softmax_gradient():
    soft = torch.softmax(torch.randn(3, 5), -1).requires_grad_()
    weights = torch.randn(3, 5)
    (top_k_gates(soft, 2) * weights).sum().backward()
    assert_close(soft.grad, weights)


def test_balance_loss_is_certainty_minus_balance_in_units_of_log_n(linear):
    model = nn.Sequential(HydraLoRALinear(linear, R, alpha=16, heads=4))
    layer = model[0]
    x = torch.randn(2, 5, IN)
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, 3:] = False  # padding does not count
    with router_balance(model, real) as collected:
        model(x)
    g = layer.gates(x)[real]
    entropy = -(g * g.log()).sum(-1).mean()
    mean = g.mean(0)
    assert_close(collected[0], (entropy - (-(mean * mean.log()).sum())) / math.log(4))
    assert layer.balance_tokens is None and layer.balance_losses == []  # restored
    with torch.no_grad():
        layer.hydra_router.zero_()
    with router_balance(model, real) as collected:
        model(x)
    assert float(collected[0].detach()) == pytest.approx(0.0, abs=1e-6)  # uniform gates: nothing to gain or lose


def test_balance_loss_makes_the_router_decisive_and_uses_every_head(linear):
    """Minimising the loss alone drives the tokens to confident, spread-out choices."""
    model = nn.Sequential(HydraLoRALinear(linear, R, alpha=16, heads=4))
    layer = model[0]
    x = torch.randn(8, 16, IN)
    optimizer = torch.optim.Adam([layer.hydra_router], lr=0.05)
    for _ in range(200):
        with router_balance(model, torch.ones(8, 16, dtype=torch.bool)) as collected:
            model(x)
        optimizer.zero_grad()
        collected[0].backward()
        optimizer.step()
    assert float(collected[0].detach()) < -0.8
    wins = torch.bincount(layer.gates(x).argmax(-1).flatten(), minlength=4)
    assert int((wins > 0).sum()) == 4


def test_linear_schedule_anneals_the_router_losses_to_zero():
    from hydra_edge.training.loop import router_weight_factor

    assert [router_weight_factor(s, 4, "constant") for s in range(4)] == [1.0] * 4
    assert [router_weight_factor(s, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_invalid_router_options_are_refused(linear):
    with pytest.raises(ValueError):
        HydraLoRALinear(linear, R, alpha=16, heads=2, router_top_k=3)
    with pytest.raises(ValueError):
        HydraLoRALinear(linear, R, alpha=16, heads=2, router_temperature=0)


@pytest.mark.slow  # trains the tiny preset
def test_a_run_with_every_lever_trains_saves_and_reloads_them(tmp_path):
    """The options reach the layers, the loss and the adapter; a reload routes as training did."""
    import json

    from cli_helpers import FP32

    from hydra_edge.adapter.inject import hydra_layers
    from hydra_edge.inference.trained import load_trained
    from hydra_edge.models.tiny import DEMO_TRAIN
    from hydra_edge.training.config import build_config
    from hydra_edge.training.finetune import run_finetune

    out = tmp_path / "run"
    levers = {
        "head_init": "random",
        "head_dropout": 0.1,
        "router_temperature": 0.5,
        "router_top_k": 2,
        "router_balance": 0.1,
        "router_loss": 0.1,
        "router_loss_schedule": "linear",
    }
    settings = {**FP32, **levers, "data": [str(DEMO_TRAIN)], "out": str(out), "max_steps": 4, "heads": "3"}
    settings.update(eval_data=None, save_every=0)
    run_finetune(build_config({}, settings))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["head_dropout"], config["router_temperature"], config["router_top_k"]) == (0.1, 0.5, 2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "router_balance" in r]
    assert len(steps) == 4 and all(r["router_loss"] > 0 for r in steps)
    # The router starts at zero (uniform gates: balance loss 0); once it moves, the loss is on.
    assert steps[0]["router_balance"] == 0 and all(r["router_balance"] != 0 for r in steps[1:])
    layer = next(iter(hydra_layers(load_trained(out).model).values()))
    assert (layer.router_temperature, layer.router_top_k) == (0.5, 2)
    gates = layer.gates(torch.randn(1, 4, layer.in_features))
    assert ((gates > 0).sum(-1) == 2).all()
