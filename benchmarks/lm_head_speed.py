"""Training step time with the selective LM head (hydra_edge/models/lm_head.py) vs the full head.

Loads a base (default: the gemma3-270m preset, 262,144-token vocabulary) as finetune does,
adds HydraLoRA, and times forward+backward steps on demo batches, alternating the two heads
step by step (A/B interleaved, so a noisy machine slows both alike). Prints a table and writes
JSON: median step time per head, the ratio, and the loss each head computed on the same batch.

    python benchmarks/lm_head_speed.py                                 # gemma3-270m, ~5 min on 2 cores
    python benchmarks/lm_head_speed.py --model tiny --steps 10 --json bench-out/lm_head.json
"""

import argparse
import statistics
import time
from pathlib import Path

from report import save_json  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per head (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--json", type=Path, default=Path("bench-out/lm_head_speed.json"))
    args = parser.parse_args()

    import torch

    from hydra_edge.adapter.inject import find_target_modules, inject_hydra_lora
    from hydra_edge.data.records import collate, read_records, tokenize_record
    from hydra_edge.models import lm_head
    from hydra_edge.models.base import load_base, resolve_mixed_precision
    from hydra_edge.models.quant import prepare_4bit_for_training
    from hydra_edge.models.tiny import DEMO_TRAIN

    precision = resolve_mixed_precision(args.mixed_precision)
    base = load_base(
        args.model, quant="nf4", gradient_checkpointing=True, dtype="fp32" if precision == "no" else "bf16"
    )
    inject_hydra_lora(base.model, find_target_modules(base.model, "mlp"), 8, 32.0, 3, 0.0)
    prepare_4bit_for_training(base.model)  # the deferral probe is an eval forward (hydra_edge/models/quant.py)
    base.model.train()
    records = read_records(DEMO_TRAIN)
    samples = [tokenize_record(base.tokenizer, r, args.seq_len) for r in records]
    batches = [
        collate(samples[i : i + args.batch_size], base.tokenizer.pad_token_id)
        for i in range(0, len(samples), args.batch_size)
    ]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    full_head = lambda model, ids, *_: False  # noqa: E731 - forces the model's own full head
    selective_head = lm_head.supports_deferred_head

    def step(kind: str, batch: dict) -> tuple[float, float]:
        lm_head.supports_deferred_head = selective_head if kind == "selective" else full_head
        started = time.perf_counter()
        with autocast:
            loss = lm_head.mean_label_loss(base.model, dict(batch))
        loss.backward()
        base.model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, float(loss)

    times: dict[str, list[float]] = {"full": [], "selective": []}
    losses: dict[str, list[float]] = {"full": [], "selective": []}
    for i in range(args.steps + 1):
        batch = batches[i % len(batches)]
        for kind in ("full", "selective") if i % 2 == 0 else ("selective", "full"):
            seconds, loss = step(kind, batch)
            print(f"step {i} {kind:>9}: {seconds:.2f} s, loss {loss:.4f}", flush=True)
            if i > 0:  # the first step of each warms caches up
                times[kind].append(seconds)
            losses[kind].append(loss)
    lm_head.supports_deferred_head = selective_head
    tokens = [int(b["attention_mask"].sum()) for b in batches[1 : args.steps + 1]]
    row = {
        "model": args.model,
        "precision": precision,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "vocab": base.model.get_output_embeddings().weight.shape[0],
        "full_head_s": statistics.median(times["full"]),
        "selective_head_s": statistics.median(times["selective"]),
        "tokens_per_step": statistics.mean(tokens),
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["full"], losses["selective"])),
    }
    row["speedup"] = row["full_head_s"] / row["selective_head_s"]
    print(f"\n{'model':>12} {'precision':>9} {'full head':>10} {'selective':>10} {'speed-up':>9} {'max |Δloss|':>12}")
    print(
        f"{row['model']:>12} {row['precision']:>9} {row['full_head_s']:>9.2f}s {row['selective_head_s']:>9.2f}s "
        f"{row['speedup']:>8.2f}x {row['max_loss_difference']:>12.2e}"
    )
    save_json(args.json, row)


if __name__ == "__main__":
    main()
