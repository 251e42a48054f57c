"""Does HydraLoRA beat LoRA at matched parameters? Per-family exact-match on a multi-task set.

Variants, all at matched trainable parameters (within 10 %, checked):
  lora     plain LoRA (`--heads 1`), its rank chosen to match HydraLoRA's parameter count;
  hydra    HydraLoRA `--heads auto` (the data's clusters pick N);
  uniform  the same N heads with the router fixed to uniform gates (`--router uniform`).
Each variant's learning rate is picked by a sweep scored on the validation split (never the
test split); then every seed trains with it and is scored on the test split (held-out
phrasings, fresh inputs; benchmarks/multitask_data.py), greedily, with the per-token PyTorch
model. Prints a table (per-family mean over seeds, and the spread), writes JSON and a PNG.

For the HydraLoRA variants it also says how the heads were used, the usual suspects when they
do not pay off: how much the router's mix over the heads differs between task families
("routing spread", total variation from the overall mix: 0 = every family gets the same mix)
and how alike the heads ended up (mean pairwise cosine similarity of the B heads).

Runs live in --work (default bench-out/quality-<model>) and a rerun skips every run that
finished with the same flags, so a long benchmark can be stopped and resumed.

    python benchmarks/quality.py --model tiny --seeds 0 1 2            # ~40 min on 2 cores
    python benchmarks/quality.py --model gemma3-270m --seeds 0 --steps 200 --lrs 2e-4 5e-4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads_vs_lora import matched_rank  # noqa: E402
from multitask_data import FAMILIES, write_splits  # noqa: E402

from hydra_edge.adapter_config import AdapterConfig

DEFAULT_LRS = {"tiny": [1e-3, 3e-3, 1e-2], "gemma3-270m": [2e-4, 5e-4, 1e-3]}
VARIANTS = ("lora", "hydra", "uniform")


def finetune(out: Path, flags: list[str]) -> dict:
    """Trains into `out`, or reuses a finished run there with the same flags (resume)."""
    done, flags_file = out / "eval_results.json", out.parent / f"{out.name}.flags.json"
    if done.is_file() and flags_file.is_file() and json.loads(flags_file.read_text()) == flags:
        print(f"reusing {out}", file=sys.stderr, flush=True)
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)  # an unfinished or different run
    cmd = [sys.executable, "-m", "hydra_edge", "finetune", "--out", str(out), *flags]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    flags_file.write_text(json.dumps(flags))
    return json.loads(done.read_text())


def trainable_params(adapter_dir: Path) -> int:
    """Parameters that trained: every adapter tensor, less a uniform router's (fixed at zero)."""
    from safetensors.torch import load_file

    config = AdapterConfig.load(adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    frozen = config.router == "uniform"
    return sum(t.numel() for key, t in tensors.items() if not (frozen and key.endswith("hydra_router")))


def score_families(adapter_dir: Path, rows: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Exact-match per task family (and "all") of the per-token PyTorch model, greedy."""
    from hydra_edge.inference import generate_greedy, load_trained

    trained = load_trained(adapter_dir)
    answers = generate_greedy(trained.model, trained.tokenizer, [r["messages"][:-1] for r in rows], max_new_tokens)
    correct: dict[str, list[bool]] = {}
    for row, answer in zip(rows, answers):
        correct.setdefault(row["task"], []).append(answer == row["messages"][-1]["content"].strip())
    scores = {family: sum(v) / len(v) for family, v in sorted(correct.items())}
    scores["all"] = sum(sum(v) for v in correct.values()) / len(rows)
    return scores


def diagnose(adapter_dir: Path, rows: list[dict]) -> dict:
    """How a HydraLoRA adapter uses its heads: the router's mean mix per task family (prompt
    tokens, averaged over modules), its routing spread and the heads' similarity."""
    import itertools

    import torch
    from safetensors.torch import load_file

    from hydra_edge.inference import load_trained, prompt_gate_mix

    trained = load_trained(adapter_dir)
    mixes: dict[str, list[list[float]]] = {}
    for row in rows:
        mixes.setdefault(row["task"], []).append(
            prompt_gate_mix(trained.model, trained.tokenizer, row["messages"][:-1])
        )
    per_family = {family: torch.tensor(m).mean(0) for family, m in sorted(mixes.items())}  # each (N,)
    overall = torch.stack(list(per_family.values())).mean(0)  # (N,)
    spread = statistics.fmean(0.5 * float((mix - overall).abs().sum()) for mix in per_family.values())
    similarities = []
    for key, heads in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        if key.endswith(".hydra_B") and heads.shape[0] > 1:  # (N, out, r)
            flat = torch.nn.functional.normalize(heads.flatten(1).float(), dim=1)  # (N, out*r)
            similarities += [float(flat[i] @ flat[j]) for i, j in itertools.combinations(range(len(flat)), 2)]
    return {
        "gate_mix": {family: [round(float(g), 3) for g in mix] for family, mix in per_family.items()},
        "routing_spread": spread,
        "head_cosine": statistics.fmean(similarities) if similarities else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", help="the sweep (default: per model)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--finetune-args", default="", help="more finetune flags for every run, one string")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, default=Path("bench-out/quality.json"))
    parser.add_argument("--png", type=Path, default=Path("bench-out/quality.png"))
    parser.add_argument("--work", type=Path, help="where the runs live (default bench-out/quality-<model>)")
    args = parser.parse_args()
    lrs = args.lrs or DEFAULT_LRS.get(args.model, [1e-4, 3e-4, 1e-3])

    work = args.work or Path("bench-out") / f"quality-{args.model}"
    data = write_splits(work / "data")
    test_rows = [json.loads(line) for line in data["test"].read_text().splitlines()]
    common = [
        "--model",
        args.model,
        "--data",
        str(data["train"]),
        "--eval-data",
        str(data["validation"]),
        "--max-steps",
        str(args.steps),
        "--save-every",
        "0",
        "--max-new-tokens",
        str(args.max_new_tokens),
        *args.finetune_args.split(),
    ]
    alpha_per_rank = 4.0  # alpha / r, the same scaling for every variant

    # HydraLoRA at the first seed and the middle learning rate fixes N and the parameter budget.
    # It trains exactly as the hydra variant's sweep point there, and is reused as that point.
    probe_lr = lrs[len(lrs) // 2]
    probe = work / f"hydra-lr{probe_lr:g}-seed{args.seeds[0]}"
    finetune(
        probe,
        [
            *common,
            "--heads",
            "auto",
            "--rank",
            str(args.rank),
            "--alpha",
            f"{alpha_per_rank * args.rank:g}",
            "--lr",
            f"{probe_lr:g}",
            "--seed",
            str(args.seeds[0]),
        ],
    )
    heads = AdapterConfig.load(probe).heads
    lora_rank, _ = matched_rank(probe)
    shape = {
        "hydra": ["--heads", "auto", "--rank", str(args.rank)],
        "uniform": ["--heads", str(heads), "--rank", str(args.rank), "--router", "uniform"],
        "lora": ["--heads", "1", "--rank", str(lora_rank)],
    }

    results = {}
    for variant in args.variants:
        rank = lora_rank if variant == "lora" else args.rank
        flags = [*common, *shape[variant], "--alpha", f"{alpha_per_rank * rank:g}"]
        sweep = {}
        for lr in lrs:
            out = work / f"{variant}-lr{lr:g}-seed{args.seeds[0]}"
            scores = finetune(out, [*flags, "--lr", f"{lr:g}", "--seed", str(args.seeds[0])])
            sweep[lr] = (scores["exact_match"], -scores["loss"])
        best_lr = max(sweep, key=lambda lr: sweep[lr])
        per_seed = []
        for seed in args.seeds:
            out = work / f"{variant}-lr{best_lr:g}-seed{seed}"
            finetune(out, [*flags, "--lr", f"{best_lr:g}", "--seed", str(seed)])
            scores_file = out / "test_scores.json"  # kept with the run, so a resumed benchmark skips it
            if not scores_file.is_file():
                scores_file.write_text(json.dumps(score_families(out, test_rows, args.max_new_tokens)))
            per_seed.append(json.loads(scores_file.read_text()))
        diagnostics = None
        if variant != "lora":
            diagnostics = diagnose(work / f"{variant}-lr{best_lr:g}-seed{args.seeds[0]}", test_rows)
        results[variant] = {
            "diagnostics": diagnostics,
            "lr": best_lr,
            "validation_sweep": {f"{lr:g}": v[0] for lr, v in sweep.items()},
            "trainable_params": trainable_params(work / f"{variant}-lr{best_lr:g}-seed{args.seeds[0]}"),
            "per_seed": per_seed,
            "heads": 1 if variant == "lora" else heads,
            "rank": rank,
        }

    budget = results.get("hydra", next(iter(results.values())))["trainable_params"]
    for variant, result in results.items():
        result["params_vs_hydra"] = result["trainable_params"] / budget
        assert abs(result["params_vs_hydra"] - 1) <= 0.10, (variant, result["params_vs_hydra"])
    _print_and_save(args, results)


def _print_and_save(args, results: dict) -> None:
    columns = [*FAMILIES, "all"]
    print(
        f"\nmodel {args.model}, {args.steps} steps, seeds {args.seeds}; test exact-match %, mean (spread = "
        "stdev over seeds)"
    )
    print(f"{'variant':<8} {'heads':>5} {'r':>3} {'params':>9} {'lr':>7} " + " ".join(f"{c[:9]:>12}" for c in columns))
    for variant, result in results.items():
        cells = []
        for column in columns:
            values = [100 * s.get(column, 0.0) for s in result["per_seed"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            result.setdefault("mean", {})[column] = statistics.fmean(values)
            result.setdefault("spread", {})[column] = spread
            cells.append(f"{statistics.fmean(values):6.1f}±{spread:<4.1f}")
        print(
            f"{variant:<8} {result['heads']:>5} {result['rank']:>3} {result['trainable_params']:>9,} "
            f"{result['lr']:>7g} " + " ".join(f"{c:>12}" for c in cells)
        )
    for variant, result in results.items():
        if result.get("diagnostics"):
            d = result["diagnostics"]
            print(
                f"{variant}: routing spread {d['routing_spread']:.3f} (0 = the same head mix for every family), "
                f"head cosine {d['head_cosine']:.3f}; mean gate per family (test prompts):"
            )
            for family, mix in d["gate_mix"].items():
                print(f"    {family:<14} " + " ".join(f"{g:.2f}" for g in mix))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"model": args.model, "steps": args.steps, "seeds": args.seeds, "results": results}, indent=2) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(results)
    for i, (variant, result) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(
            xs,
            [result["mean"][c] for c in columns],
            width,
            yerr=[result["spread"][c] for c in columns],
            label=f"{variant} (lr {result['lr']:g})",
            capsize=2,
        )
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(columns))], columns, rotation=20)
    ax.set_ylabel("test exact-match %")
    ax.set_title(f"{args.model}: {args.steps} steps, seeds {args.seeds}, matched parameters")
    ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
