"""4-bit specifics, kept apart from the layer code (as PEFT keeps `bnb.py` apart).

bitsandbytes is imported inside the functions, so `import hydra_edge` stays fast.

Training through 4-bit layers on a CPU with AVX512-BF16 or AMX: bitsandbytes' `Linear4bit.forward`
(0.49 and 0.50), when the layer is in eval mode and its input needs no gradient, repacks the
weight into a layout for its fused CPU inference kernel (`packing_format_for_cpu`) and never
packs it back. A training forward through a repacked layer then gives its input no gradient, so
the adapters below it learn next to nothing: one eval pass, or the LM-head probe, cost the demo
40 points of exact-match, silently. `prepare_4bit_for_training` switches that packing off for the
layers of a model that trains, unpacks any layer already repacked (bitsandbytes' own
`_save_to_state_dict` does the same), and unpacks again before any training forward, should a
later version repack by another rule; `check_4bit_backprop` then checks the result by what
matters, the gradient each layer passes back, so a layout no code here knows of stops the run
with the layer's name instead of training on. Inference-only models (chat, serve, eval) keep
bitsandbytes' own choice.
"""

from __future__ import annotations

from hydra_edge.errors import LayerCannotTrain

# A layer's probe: how far the gradient's prediction of the output change may be off (bf16: ~1e-2).
BACKPROP_TOLERANCE = 0.05


def bnb_config(quant: str, compute_dtype=None):
    """The `BitsAndBytesConfig` for `--quant nf4|fp4` (double quant; compute in compute_dtype,
    bf16 unless given), or None."""
    if quant == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def is_linear4bit(module) -> bool:
    """True for a bitsandbytes `Linear4bit` (checked by name so bitsandbytes is not imported)."""
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def dequantized_weight(layer):
    """The weight a layer really multiplies by: NF4/FP4 weights dequantized, others as is.

    (out, in). The export base and the merge math use this, not the original checkpoint.
    """
    if is_linear4bit(layer):
        import bitsandbytes.functional as bnbf

        standard_layout(layer)  # a repacked weight would dequantize to noise
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data


def four_bit_layers(model) -> dict:
    """{name: module} for every bitsandbytes `Linear4bit` of a model."""
    return {name: module for name, module in model.named_modules() if is_linear4bit(module)}


def is_repacked_for_inference(layer) -> bool:
    """Whether bitsandbytes has moved the layer's weight into its CPU inference-only layout."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def standard_layout(layer) -> None:
    """Returns a repacked 4-bit weight to bitsandbytes' standard layout (a no-op otherwise).

    The conversion back is bitsandbytes' own. It re-quantizes the block scales, which the
    packing rounded to bf16, so the weight can differ from the loaded one in its last bits; that
    is why a model that trains never packs. Where a version lacks it, the layer stays as it is
    and check_4bit_backprop reports it."""
    if not is_repacked_for_inference(layer):
        return
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:
        return
    layer.weight.data, layer.weight.quant_state = unpack(layer.weight.data, layer.weight.quant_state)


def _layout_for_the_forward(layer, args) -> None:
    """Forward pre-hook on the 4-bit layers of a model that trains."""
    if layer.training:
        standard_layout(layer)
    else:  # an inference forward: the weight may come out in another layout
        layer._hydra_unverified = True


def prepare_4bit_for_training(model) -> None:
    """Keeps every 4-bit layer of a model that trains in a layout that backpropagates (the
    module docstring says why), and marks each for check_4bit_backprop. Idempotent."""
    for layer in four_bit_layers(model).values():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False  # no repacking in this model's eval passes
        standard_layout(layer)
        if not getattr(layer, "_hydra_trains", False):
            layer.register_forward_pre_hook(_layout_for_the_forward)
            layer._hydra_trains = True
        layer._hydra_unverified = True


def backprop_problem(layer) -> str | None:
    """What keeps a linear layer from passing its input the right gradient, or None.

    Checked by the layer's own arithmetic, not by bitsandbytes' internals: for y(x) = W·x + b
    and d = y(x) - y(0), the gradient g of <y(x), d> with respect to x satisfies <g, x> = |d|².
    A missing gradient, or one computed from other weights than the forward used, breaks it.
    Runs in training mode on two random rows; leaves the layer as it found it."""
    import torch

    was_training = layer.training
    device = layer.weight.device
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    x = torch.randn(2, layer.in_features, generator=generator).to(device, dtype).requires_grad_()  # (2, in)
    layer.train()
    try:
        with torch.enable_grad():
            y = layer(x).float()  # (2, out)
            with torch.no_grad():
                d = y.detach() - layer(torch.zeros_like(x)).float()  # (2, out)
            g = torch.autograd.grad((y * d).sum(), x, allow_unused=True)[0] if y.requires_grad else None
    finally:
        layer.train(was_training)
    if g is None:
        return "no gradient reaches its input"
    expected = float((d * d).sum())
    got = float((g.float() * x.detach().float()).sum())
    if not (abs(got - expected) <= BACKPROP_TOLERANCE * max(expected, 1e-12)):
        return f"the gradient disagrees with the forward pass (<g, x> = {got:.4g}, |d|² = {expected:.4g})"
    return None


def check_4bit_backprop(model, when: str) -> None:
    """Stops training with one line naming the first 4-bit layer that cannot backpropagate.

    Probes the layers not verified since prepare_4bit_for_training or since their last
    inference forward (an eval pass, a probe), so between such forwards it costs nothing;
    the loop calls it before every step. `when` names the moment (e.g. "before step 51")."""
    for name, layer in four_bit_layers(model).items():
        if not getattr(layer, "_hydra_unverified", True):
            continue
        problem = backprop_problem(layer)
        if problem is not None:
            import bitsandbytes

            raise LayerCannotTrain(
                f"4-bit layer {name} cannot be trained through {when}: {problem} (bitsandbytes "
                f"{bitsandbytes.__version__}); the run stopped rather than learn from wrong gradients "
                "(saved checkpoints are kept); --quant none trains without 4-bit layers"
            )
        layer._hydra_unverified = False
