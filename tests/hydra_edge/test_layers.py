"""The HydraLoRA math: invariants against the base, PEFT's LoRA and a naive per-head loop."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hydra_edge.adapter.layer import HydraLoRALinear

IN, OUT, R = 32, 48, 4


def naive_forward(layer: HydraLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The reference implementation: one matmul per head, in a Python loop."""
    gates = torch.softmax(x.float() @ layer.hydra_router.float().T, dim=-1)  # (B, T, N)
    h = x @ layer.hydra_A.T  # (B, T, r)
    delta = sum(gates[..., i : i + 1] * (h @ layer.hydra_B[i].T) for i in range(layer.heads))
    return layer.base_layer(x) + layer.scaling * delta


def randomize_heads(layer: HydraLoRALinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.hydra_B.copy_(torch.randn(layer.hydra_B.shape, generator=g) * 0.1)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


@pytest.fixture
def nf4_linear(tiny_dir):
    """A real bitsandbytes Linear4bit (NF4, double quant) taken from the tiny preset."""
    from hydra_edge.models.base import load_base

    base = load_base("tiny", quant="nf4", device="cpu")
    layer = base.model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit"
    return layer


def test_zero_heads_equal_base_exactly(linear):
    x = torch.randn(2, 5, IN)
    layer = HydraLoRALinear(linear, R, alpha=16, heads=3)
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_batched_heads_equal_naive_loop(linear, heads):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=heads)
    randomize_heads(layer)
    x = torch.randn(3, 7, IN)
    assert_close(layer(x), naive_forward(layer, x), atol=1e-5, rtol=1e-5)


def peft_lora_output(base: nn.Module, A: torch.Tensor, B: torch.Tensor, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA (the test-only reference) on a copy of base, with the given A and B."""
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    peft_model = get_peft_model(
        wrapper, LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    )
    lora_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(A)
        lora_layer.lora_B["default"].weight.copy_(B)
    peft_model.eval()
    return peft_model(x)


def test_one_head_equals_peft_lora(linear):
    layer = HydraLoRALinear(copy.deepcopy(linear), R, alpha=16, heads=1)
    randomize_heads(layer)
    x = torch.randn(2, 6, IN)
    expected = peft_lora_output(copy.deepcopy(linear), layer.hydra_A.detach(), layer.hydra_B[0].detach(), 16, x)
    assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_nf4_zero_heads_equal_base(nf4_linear):
    x = torch.randn(2, 5, nf4_linear.in_features, dtype=torch.bfloat16)
    expected = nf4_linear(x)
    layer = HydraLoRALinear(nf4_linear, R, alpha=16, heads=3)
    assert layer.base_layer is nf4_linear  # wrapped, not copied
    assert torch.equal(layer(x), expected)


def test_nf4_batched_heads_equal_naive_loop(nf4_linear):
    layer = HydraLoRALinear(nf4_linear, R, alpha=16, heads=4)
    randomize_heads(layer)
    x = torch.randn(2, 5, nf4_linear.in_features)
    assert_close(layer(x).float(), naive_forward(layer, x).float(), atol=1e-4, rtol=1e-4)


def test_nf4_one_head_equals_peft_lora(nf4_linear):
    layer = HydraLoRALinear(nf4_linear, R, alpha=16, heads=1)
    randomize_heads(layer)
    x = torch.randn(2, 5, nf4_linear.in_features)
    ours = layer(x).float()
    expected = peft_lora_output(nf4_linear, layer.hydra_A.detach(), layer.hydra_B[0].detach(), 16, x).float()
    assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_gates_are_float32_and_sum_to_one(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=3)
    x = torch.randn(2, 4, IN, dtype=torch.bfloat16)
    gates = layer.gates(x)
    assert gates.dtype == torch.float32 and gates.shape == (2, 4, 3)
    assert_close(gates.sum(-1), torch.ones(2, 4))


def test_only_adapter_parameters_train(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=2, dropout=0.1)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"hydra_A", "hydra_B", "hydra_router"}
    randomize_heads(layer)
    layer(torch.randn(2, 3, IN)).sum().backward()
    assert linear.weight.grad is None
    assert all(getattr(layer, n).grad is not None for n in trainable)


def test_random_head_init_gives_distinct_heads(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=3, head_init="random")
    assert not torch.equal(layer.hydra_B[0], layer.hydra_B[1])
    assert layer.hydra_B.abs().max() > 0


def test_dropout_only_on_adapter_path(linear):
    layer = HydraLoRALinear(linear, R, alpha=16, heads=2, dropout=0.5)
    x = torch.randn(2, 3, IN)
    layer.train()
    # With zero heads the output is the base's, whatever dropout does to the A path.
    assert torch.equal(layer(x), linear(x))
    randomize_heads(layer)
    assert not torch.equal(layer(x), layer(x))  # dropout now changes the branch in training
    layer.eval()
    assert_close(layer(x), naive_forward(layer, x), atol=1e-5, rtol=1e-5)  # and never touches the gates
    layer.train()
    torch.manual_seed(3)
    gates_train = layer.gates(x)
    assert torch.equal(gates_train, layer.gates(x))


@pytest.mark.parametrize("training", [False, True])
def test_fixed_gates_equal_one_merged_lora(linear, training):
    """With gates fixed to ḡ, the heads collapse into one LoRA: B̄ = Σ_i ḡ_i B_i (the export's merge),
    whether the forward takes the merged path (eval) or the gated copies of A·x (training)."""
    layer = HydraLoRALinear(linear, R, alpha=16, heads=3).train(training)
    randomize_heads(layer)
    gates = torch.tensor([0.2, 0.5, 0.3])
    layer.fixed_gates = gates
    x = torch.randn(2, 5, IN)
    merged_b = torch.einsum("n,nor->or", gates, layer.hydra_B.detach())  # (out, r)
    expected = linear(x) + layer.scaling * (x @ layer.hydra_A.detach().T) @ merged_b.T
    assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_what_fixed_gates_add_to_the_base_weight(linear):
    """layer(x) - base(x) == x · delta_weight(ḡ)ᵀ: the weight a merged export folds into W0."""
    layer = HydraLoRALinear(linear, R, alpha=16, heads=3).eval()
    randomize_heads(layer, seed=1)
    gates = torch.tensor([0.6, 0.1, 0.3])
    delta = layer.delta_weight(gates)  # (out, in)
    assert delta.shape == (OUT, IN) and delta.dtype == torch.float32
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        layer.fixed_gates = gates
        got = layer(x) - linear(x)
    assert_close(got, x @ delta.T, atol=1e-5, rtol=1e-5)
    naive = layer.scaling * sum(g * layer.hydra_B[i].detach() for i, g in enumerate(gates)) @ layer.hydra_A.detach()
    assert_close(delta, naive, atol=1e-6, rtol=1e-6)


def test_router_supervision_is_the_cross_entropy_of_the_router_logits(linear):
    layer = HydraLoRALinear(linear, R, 8.0, 3)
    x = torch.randn(2, 5, IN)
    targets = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])  # -1: padding, no target
    layer.router_targets, layer.router_losses = targets, []
    layer(x)
    ((nll, count),) = layer.router_losses
    logits = x @ layer.hydra_router.T  # (B, T, N)
    expected = torch.nn.functional.cross_entropy(logits[targets >= 0], targets[targets >= 0], reduction="sum")
    assert count == 7
    assert_close(nll, expected)
    nll.backward()
    assert layer.hydra_router.grad is not None and layer.hydra_A.grad is None  # it trains the router only


def test_pooled_gates_are_each_groups_mean_over_its_sources(linear):
    layer = HydraLoRALinear(linear, R, 8.0, 3)
    randomize_heads(layer)
    x = torch.randn(2, 5, IN)
    groups = torch.tensor([[0, 0, 0, -1, -1], [1, 1, 2, 2, 2]])  # row 1 packs two samples
    every = groups >= 0
    per_token = layer.gates(x)  # (B, T, N)
    layer.pool_groups = (groups, every)
    pooled = layer.gates(x)
    for row, (start, end) in [(0, (0, 3)), (1, (0, 2)), (1, (2, 5))]:
        assert_close(pooled[row, start:end], per_token[row, start:end].mean(0).expand(end - start, -1))
    assert torch.equal(pooled[0, 3:], torch.zeros(2, 3))  # padding
    # Sources: only the first token of each group counts; group 2 has none, so all of it counts.
    sources = torch.tensor([[True, False, False, False, False], [True, False, False, False, False]])
    layer.pool_groups = (groups, sources)
    pooled = layer.gates(x)
    assert_close(pooled[0, :3], per_token[0, :1].expand(3, -1))
    assert_close(pooled[1, :2], per_token[1, :1].expand(2, -1))
    assert_close(pooled[1, 2:], per_token[1, 2:].mean(0).expand(3, -1))
    # One group may span rows (a data cluster across the batch).
    layer.pool_groups = (torch.tensor([[0, 0, 0, -1, -1], [0, 0, 0, 0, 0]]), every | True)
    pooled = layer.gates(x)
    both = torch.cat([per_token[0, :3], per_token[1]]).mean(0)
    assert_close(pooled[1, 4], both)
    assert_close(pooled[0, 0], both)
    # ...and the output is the merged computation with those gates
    layer.pool_groups = None
    layer.fixed_gates = per_token[0, :3].mean(0)
    expected = layer(x[:1, :3])
    layer.fixed_gates, layer.pool_groups = None, (groups[:1, :3], every[:1, :3])
    assert_close(layer(x[:1, :3]), expected)


def test_uniform_router_gives_every_head_the_same_weight_and_does_not_train(linear):
    from hydra_edge.adapter.inject import freeze_uniform_router

    model = torch.nn.Sequential(HydraLoRALinear(linear, R, 8.0, 4))
    freeze_uniform_router(model)
    layer = model[0]
    gates = layer.gates(torch.randn(2, 3, IN))
    assert torch.allclose(gates, torch.full_like(gates, 0.25))
    assert not layer.hydra_router.requires_grad and layer.hydra_A.requires_grad
