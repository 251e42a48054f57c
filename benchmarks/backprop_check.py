"""Adapter gradients before and after an inference forward, on this machine's 4-bit path.

    python benchmarks/backprop_check.py [--model tiny|PATH] [--device cpu|cuda] [--dtype fp32|bf16]
                                        [--json FILE]

A training run scores the model in eval mode between steps (the LM-head probe, --eval-every).
This loads the base in NF4 with a HydraLoRA adapter (random heads, so every adapter weight gets
a gradient), computes the adapter's gradients, runs one eval-mode forward without gradients, and
computes them again: twice, once with bitsandbytes as it is and once prepared for training as
the trainer prepares it (hydra_edge/models/quant.py). Prints the CPU class or GPU, which 4-bit layers
bitsandbytes repacked, the largest relative gradient difference and the guard's verdict; writes
JSON. Exit code 1 when the prepared model's gradients change.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from hydra_edge.adapter.inject import find_target_modules, inject_hydra_lora
from hydra_edge.data.records import collate, read_records, tokenize_records
from hydra_edge.models.base import cpu_class, load_base, pick_device
from hydra_edge.models.quant import (
    backprop_problem,
    four_bit_layers,
    is_repacked_for_inference,
    prepare_4bit_for_training,
)
from hydra_edge.models.tiny import DEMO_TRAIN


def adapter_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_case(model_ref: str, device: str, dtype: str, prepared: bool) -> dict:
    base = load_base(model_ref, quant="nf4", device=device, dtype=dtype)
    model = base.model
    torch.manual_seed(0)
    inject_hydra_lora(model, find_target_modules(model, "all"), 8, 16, 3, 0.0, "random")
    if prepared:
        prepare_4bit_for_training(model)
    records = read_records(DEMO_TRAIN)[:4]
    samples = tokenize_records(base.tokenizer, records, 64, [0] * len(records), "truncate", False).samples
    batch = {k: v.to(device) for k, v in collate(samples, base.tokenizer.pad_token_id).items()}
    model.train()
    before = adapter_gradients(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], use_cache=False)
    model.train()
    layers = four_bit_layers(model)
    repacked = [name for name, layer in layers.items() if is_repacked_for_inference(layer)]
    after = adapter_gradients(model, batch)
    worst = max(float((after[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in before.items())
    problems = {name: p for name, layer in layers.items() if (p := backprop_problem(layer))}
    return {
        "bitsandbytes": "prepared for training" if prepared else "as it is",
        "four_bit_layers": len(layers),
        "repacked_after_eval": len(repacked),
        "max_relative_grad_change": worst,
        "layers_failing_the_guard": len(problems),
        "first_problem": next(iter(problems.items()), None),
    }


def main() -> int:
    import bitsandbytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = args.device or pick_device()
    machine = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {cpu_class()}"
    rows = [one_case(args.model, device, args.dtype, prepared) for prepared in (False, True)]
    print(f"backprop check: {args.model}, NF4 {args.dtype}, {machine}, bitsandbytes {bitsandbytes.__version__}")
    print(f"{'bitsandbytes':<24} {'4-bit':>6} {'repacked':>9} {'max rel. grad change':>21} {'guard fails':>12}")
    for r in rows:
        print(
            f"{r['bitsandbytes']:<24} {r['four_bit_layers']:>6} {r['repacked_after_eval']:>9} "
            f"{r['max_relative_grad_change']:>21.2e} {r['layers_failing_the_guard']:>12}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"model": args.model, "dtype": args.dtype, "machine": machine, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    prepared = rows[1]
    return 0 if prepared["max_relative_grad_change"] < 1e-6 and not prepared["layers_failing_the_guard"] else 1


if __name__ == "__main__":
    sys.exit(main())
