"""HydraLoRA (--heads auto) vs plain LoRA (--heads 1) at equal trainable parameters.

Trains both on the same model and data, side by side, then prints a table and writes JSON:
trainable parameters, median step time, tokens/s, final loss and held-out exact-match.
The LoRA rank is chosen so its parameter count matches HydraLoRA's (closest integer rank),
and its alpha keeps the same alpha/r scaling.

    python benchmarks/heads_vs_lora.py                       # tiny preset + demo data, ~2 min on 2 cores
    python benchmarks/heads_vs_lora.py --steps 100 --json bench-out/heads.json
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_json  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from run_summary import summarise  # noqa: E402

from hydra_edge.adapter.config import AdapterConfig


def finetune(out: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "hydra_edge", "finetune", "--out", str(out), *extra]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def matched_rank(adapter_dir: Path) -> tuple[int, int]:
    """(LoRA rank with the closest parameter count to this HydraLoRA adapter, that count)."""
    from safetensors import safe_open

    target, dims = 0, []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            target += int(__import__("math").prod(shape))
            if key.endswith(".hydra_B"):
                module = key[: -len(".hydra_B")]
                in_features = f.get_slice(module + ".hydra_A").get_shape()[1]
                dims.append((in_features, shape[1]))

    # heads=1: per module r*(in + out) + in (the 1-row router)
    def count(r):
        return sum(r * (i + o) + i for i, o in dims)

    best = min(range(1, 1025), key=lambda r: abs(count(r) - target))
    return best, count(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--json", type=Path, default=Path("bench-out/heads_vs_lora.json"))
    parser.add_argument("--extra", default="", help="more finetune flags, space separated")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hydra-heads-"))
    common = ["--model", args.model, "--max-steps", str(args.steps), "--save-every", "0", *args.extra.split()]
    hydra_out, lora_out = work / "hydra", work / "lora"
    finetune(hydra_out, [*common, "--heads", "auto", "--rank", str(args.rank), "--alpha", str(args.alpha)])
    lora_rank, _ = matched_rank(hydra_out)
    lora_alpha = args.alpha * lora_rank / args.rank
    finetune(lora_out, [*common, "--heads", "1", "--rank", str(lora_rank), "--alpha", f"{lora_alpha:g}"])

    rows = []
    for label, out in (("HydraLoRA --heads auto", hydra_out), (f"LoRA --heads 1 (r={lora_rank})", lora_out)):
        config = AdapterConfig.load(out)
        rows.append({"run": label, "heads": config.heads, "rank": config.rank, **summarise(out)})
    print(f"\nmodel {args.model}, {args.steps} steps each (same data, seed, batch)")
    print(f"{'run':<28} {'heads':>5} {'r':>4} {'params':>9} {'step ms':>8} {'tok/s':>7} {'loss':>7} {'exact':>6}")
    for r in rows:
        em = "n/a" if r.get("exact_match") is None else f"{100 * r['exact_match']:.1f}%"
        print(
            f"{r['run']:<28} {r['heads']:>5} {r['rank']:>4} {r['trainable_params']:>9,} "
            f"{1000 * r['median_step_time_s']:>8.1f} "
            f"{r['median_tokens_per_s']:>7.0f} {r['last_loss']:>7.4f} {em:>6}"
        )
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
