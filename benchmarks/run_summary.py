"""Summarises a finetune run's metrics.jsonl: step time, tokens/s, peak GPU memory, loss trend.

    python benchmarks/run_summary.py OUT_DIR [--label NAME] [--require-falling-loss] [--json FILE]

Exit code 1 with --require-falling-loss when the last steps' mean loss is not below the first's.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarise(out_dir: Path, warmup_steps: int = 3) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[warmup_steps:] or rows
    window = max(1, len(rows) // 5)
    first = statistics.fmean(r["loss"] for r in rows[:window])
    last = statistics.fmean(r["loss"] for r in rows[-window:])
    summary = {
        "steps": len(rows),
        "median_step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "first_loss": first,
        "last_loss": last,
        "peak_gpu_mem_gb": max((r.get("peak_gpu_mem_gb", 0.0) for r in rows), default=0.0),
    }
    adapter = out_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:
            summary["trainable_params"] = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    results = out_dir / "eval_results.json"
    if results.is_file():
        summary["exact_match"] = json.loads(results.read_text())["exact_match"]
    return summary


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--label", default=None)
    parser.add_argument("--require-falling-loss", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    s = summarise(args.out_dir)
    label = args.label or args.out_dir.name
    print(
        f"{label}: {s['steps']} steps, step {s['median_step_time_s'] * 1000:.0f} ms, "
        f"{s['median_tokens_per_s']:.0f} tokens/s, "
        f"peak GPU memory {s['peak_gpu_mem_gb']:.2f} GiB, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"label": label, **s}, indent=2) + "\n")
    if args.require_falling_loss and not s["last_loss"] < s["first_loss"]:
        print(f"{label}: loss did not fall", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
