"""4-bit layers keep passing the right gradients through every eval-to-train transition, on any CPU.

On a CPU with AVX512-BF16 or AMX, bitsandbytes repacks a `Linear4bit` weight for its fused
inference kernel during any eval-mode forward, and a training forward through a repacked layer
gives its input no gradient (hydra_edge/models/quant.py). The `avx512_bf16_host` fixture makes any
CPU take that path: bitsandbytes is told the CPU has AVX512-BF16 (each Linear4bit reads that
when it is built), and a repacked layer's output carries no gradient, as the fused kernel's
does. On an AVX2-only CPU the repacked weight also computes wrong outputs (the kernel that reads
that layout is not registered there), which the tests need not care about: a run must never
compute with a repacked layer while it trains.

The eval-to-train transitions a training process goes through, each covered here:
- the LM-head probe (`lm_head.supports_deferred_head`, an eval forward before the first step);
- the held-out pass of `--eval-every` (and `--early-stopping`, which rides on it);
- resuming from a checkpoint (a new model, probed again before its first step);
- anything else that runs the model in eval mode between two steps: every inference forward marks
  the layers it ran through, and the loop verifies those before the next step.
After training, the gate pass and the final eval only infer.
"""

import os
import signal

import pytest
import torch

from hydra_edge.adapter.inject import adapter_state_dict
from hydra_edge.errors import TrainingStopped
from hydra_edge.models import quant
from hydra_edge.models.tiny import DEMO_EVAL, DEMO_TRAIN
from hydra_edge.training.config import build_config
from hydra_edge.training.finetune import run_finetune

# NF4 in float32 (no autocast), no dropout: two runs that see the same gradients are equal.
NF4_FP32 = {"quant": "nf4", "mixed_precision": "no", "dropout": 0.0, "heads": "2", "batch_size": 4, "seq_len": 64}


def report_avx512_bf16(monkeypatch, present: bool) -> None:
    """bitsandbytes behaves as on a CPU with (present) or without AVX512-BF16, whatever this CPU is."""
    import bitsandbytes
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: present)
    if not present:
        return
    real_matmul = bitsandbytes.matmul_4bit

    def fused_kernel_matmul(A, B, quant_state, out=None, bias=None):
        result = real_matmul(A, B, quant_state, out=out, bias=bias)
        return result.detach() if getattr(quant_state, "packing_format_for_cpu", False) else result

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", fused_kernel_matmul)


@pytest.fixture
def avx512_bf16_host(monkeypatch):
    report_avx512_bf16(monkeypatch, True)


def nf4_tiny():
    from hydra_edge.models.base import load_base

    return load_base("tiny", quant="nf4", device="cpu", dtype="fp32").model


def inference_forward(module, *args, **kwargs):
    """What an eval pass does to a module: eval mode, no gradients; then back to training."""
    module.eval()
    with torch.no_grad():
        module(*args, **kwargs)
    module.train()


def test_the_forced_host_reproduces_the_defect(avx512_bf16_host, tiny_dir):
    """Without hydra-edge's preparation, one inference forward leaves a layer that cannot train:
    the harness reaches bitsandbytes' repacking path (if a release stops repacking, this fails
    and the harness needs another look)."""
    layer = nf4_tiny().model.layers[0].mlp.down_proj
    assert quant.backprop_problem(layer) is None
    inference_forward(layer, torch.randn(2, layer.in_features))
    assert quant.is_repacked_for_inference(layer)
    assert quant.backprop_problem(layer) == "no gradient reaches its input"


def _batch(model_tokens: int = 48) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, model_tokens), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _adapter_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_gradients_after_an_inference_forward_equal_the_reference(avx512_bf16_host, tiny_dir):
    from hydra_edge.adapter.inject import find_target_modules, hydra_layers, inject_hydra_lora

    model = nf4_tiny()
    torch.manual_seed(0)
    inject_hydra_lora(model, find_target_modules(model, "mlp"), 8, 16, 3, 0.0, "random")
    quant.prepare_4bit_for_training(model)
    model.train()
    batch = _batch()
    reference = _adapter_gradients(model, batch)  # no inference forward has run yet
    inference_forward(model, input_ids=batch["input_ids"], use_cache=False)
    assert not any(quant.is_repacked_for_inference(layer) for layer in quant.four_bit_layers(model).values())
    quant.check_4bit_backprop(model, "after the inference forward")
    after = _adapter_gradients(model, batch)
    assert reference.keys() == after.keys() and len(reference) == 3 * len(hydra_layers(model))  # A, B, router
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after[name], grad, atol=0, rtol=0, msg=name)


def test_a_repacked_layer_is_unpacked_before_a_training_forward(avx512_bf16_host, tiny_dir):
    """If a layer is repacked anyway (another rule in a later bitsandbytes), the training
    forward gets it back in the standard layout; bitsandbytes' conversion back re-quantizes
    the block scales, so the gradient agrees closely, not bit for bit."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = nf4_tiny().train()
    quant.prepare_4bit_for_training(model)
    layer = model.model.layers[1].mlp.up_proj
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    reference = x.grad.clone()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert quant.is_repacked_for_inference(layer)
    x.grad = None
    layer(x).square().sum().backward()
    assert not quant.is_repacked_for_inference(layer)
    relative_error = float((x.grad - reference).norm() / reference.norm())
    assert relative_error < 1e-2, relative_error


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: weight.clone() for name, weight in adapter_state_dict(model).items()}


def _finetune(out, on_step=None, **settings):
    config = build_config({}, {**NF4_FP32, "out": str(out), "grad_accum": 1, **settings})
    return run_finetune(config, set(settings), on_step=on_step)


@pytest.mark.slow
def test_trainer_sequence_with_repacking_forced_equals_a_run_that_never_repacks(monkeypatch, tmp_path):
    """The real sequence on NF4: LM-head probe, steps, held-out evals every 3 steps, SIGTERM at
    step 5, resume (a new model, probed again), more steps and evals, on a CPU that repacks.
    Every step's adapter equals, within float tolerance, a straight run with no eval pass on a
    CPU that never repacks, so every step saw the same gradients."""
    steps = 8
    eval_rows = {"eval_data": str(DEMO_EVAL), "eval_em_rows": 2, "max_new_tokens": 8}
    report_avx512_bf16(monkeypatch, False)
    reference = {}
    _finetune(
        tmp_path / "reference", lambda step, model, skipped: reference.update({step: snapshot(model)}),
        max_steps=steps, eval_data=None,
    )  # fmt: skip

    report_avx512_bf16(monkeypatch, True)
    seen = {}

    def stop_at_five(step, model, skipped):
        seen[step] = snapshot(model)
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves a checkpoint and stops after this step

    out = tmp_path / "evals"
    with pytest.raises(TrainingStopped):
        _finetune(out, stop_at_five, max_steps=steps, eval_every=3, save_every=0, **eval_rows)
    result = _finetune(out, lambda step, model, skipped: seen.update({step: snapshot(model)}), resume=True)
    assert result["train"]["steps"] == steps
    evals = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line]
    assert len(evals) == 3  # steps 3, 6, 8
    assert sorted(seen) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for name, weight in reference[step].items():
            torch.testing.assert_close(seen[step][name], weight, atol=1e-6, rtol=1e-5, msg=f"step {step} {name}")


@pytest.mark.slow
def test_a_layer_that_cannot_backpropagate_stops_the_run_with_its_name(avx512_bf16_host, monkeypatch, tmp_path):
    """A bitsandbytes that repacks by a rule hydra-edge does not know and cannot undo: the run
    stops before its second step (the LM-head probe ran in the first) with one line naming the
    layer, instead of training on without gradients."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn import Linear4bit
    from cli_helpers import assert_one_line_error, run_in_process

    real_forward = Linear4bit.forward

    def always_repacking_forward(self, x):
        if not self.training and not x.requires_grad and not quant.is_repacked_for_inference(self):
            self.weight.data, self.weight.quant_state = _convert_weight_packed_for_cpu(
                self.weight.data, self.weight.quant_state
            )
        return real_forward(self, x)

    monkeypatch.setattr(Linear4bit, "forward", always_repacking_forward)
    monkeypatch.setattr(quant, "standard_layout", lambda layer: None)
    result = run_in_process(
        "finetune", "--mixed-precision", "no", "--max-steps", "3", "--out", str(tmp_path / "run"),
        "--data", str(DEMO_TRAIN),
    )  # fmt: skip
    assert_one_line_error(result, "4-bit layer model.layers.0.", "before step 2", "no gradient reaches its input")
