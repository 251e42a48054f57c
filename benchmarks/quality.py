"""Does HydraLoRA beat LoRA at matched parameters, and do its heads specialise? Per-family
exact-match on a multi-task set, over seeds.

Variants (VARIANTS below), all at matched trainable parameters (LoRA within 5 %, checked):
  lora        plain LoRA (`--heads 1`), its rank chosen to match HydraLoRA's parameter count;
  hydra       the reference HydraLoRA: zero heads, kaiming router (`--head-init zero`);
  rlora       R-LoRA symmetry breaking: distinct heads that sum to zero, router at zero, and
              per-head dropout on A·x (`--head-init random --head-dropout 0.1`);
  balance     rlora plus the balance-and-certainty router loss (`--router-balance`);
  topk        rlora with top-2 routing (straight-through; `--router-top-k 2`);
  sharp       rlora with a sharper, 10x faster-moving router (`--router-temperature 0.1`);
  supervised  rlora plus the cluster-supervised router loss, annealed to 0 (`--router-loss`);
  routed      sharp plus the cluster-supervised router loss, kept on (`--router-loss 0.1`);
  sequence    rlora with every step's gates pooled over each sample's prompt (sequence-level
              routing: `--pooled-steps 1 --pool-over prompt`);
  uniform     rlora's distinct heads with the gates fixed equal (`--router uniform`): the
              ablation that says what the router adds.
The learning rate of each variant in --sweep (default: lora) is picked on the validation split
(never the test split) at the first seed; the others train at --lr. Every seed is then scored
on the test split (held-out phrasings, fresh inputs; benchmarks/multitask_data.py), greedily,
twice: with the per-token router (what `dynamic` exports) and with each request's cluster mean
gates (what the `adapters` and `merged` exports serve; their fp32 ONNX logits match this within
1e-3). Prints a table (mean ± standard deviation over seeds), writes JSON and a PNG.

How the heads were used, per seed: the routing spread (total variation between each task
family's mean gate mix and the overall mix, averaged over modules: 0 = every family gets the same
mix), the heads' mean pairwise cosine similarity, and the largest share of tokens one head wins.

Runs live in --work (default bench-out/quality-<model>) and a rerun skips every run that
finished with the same flags, so a long benchmark can be stopped and resumed.

    python benchmarks/quality.py --model tiny --seeds 0 1 2
    python benchmarks/quality.py --model gemma3-270m --steps 150 --variants lora hydra rlora uniform
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

from hydra_edge.adapter.config import AdapterConfig

DEFAULT_LRS = {"tiny": [1e-3, 3e-3, 1e-2], "gemma3-270m": [3e-4, 1e-3]}
DEFAULT_LR = {"tiny": 3e-3, "gemma3-270m": 1e-3}
RLORA = ["--head-init", "random", "--head-dropout", "0.1"]
VARIANTS = {
    "lora": ["--heads", "1"],
    "hydra": ["--head-init", "zero"],
    "rlora": RLORA,
    "balance": [*RLORA, "--router-balance", "0.1"],
    "topk": [*RLORA, "--router-top-k", "2"],
    "sharp": [*RLORA, "--router-temperature", "0.1"],
    "supervised": [*RLORA, "--router-loss", "0.1", "--router-loss-schedule", "linear"],
    "routed": [*RLORA, "--router-temperature", "0.1", "--router-loss", "0.1"],
    "sequence": [*RLORA, "--pooled-steps", "1", "--pool-over", "prompt"],
    "uniform": [*RLORA, "--router", "uniform"],
}


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


def score_run(adapter_dir: Path, rows: list[dict], max_new_tokens: int) -> dict:
    """Exact-match per task family (and "all") of one trained run, greedy, two ways: the per-token
    router, and each row's routed cluster mean gates (what a per-cluster export serves); plus
    how the heads were used (diagnose)."""
    import torch

    from hydra_edge.adapter.gates import cluster_gates
    from hydra_edge.adapter.inject import hydra_layers
    from hydra_edge.adapter.switches import fixed_gates
    from hydra_edge.data.records import routing_text
    from hydra_edge.inference.trained import generate_greedy, load_trained

    trained = load_trained(adapter_dir)
    prompts = [r["messages"][:-1] for r in rows]
    routed = trained.clusters.assign([routing_text(p) for p in prompts]).tolist()  # as serving routes
    per_token = generate_greedy(trained.model, trained.tokenizer, prompts, max_new_tokens)
    pinned = list(per_token)
    if trained.config.heads > 1:
        gates = cluster_gates(adapter_dir)
        for cluster in sorted(set(routed)):
            picked = [i for i, c in enumerate(routed) if c == cluster]
            with fixed_gates(trained.model, gates[cluster]):
                answers = generate_greedy(
                    trained.model, trained.tokenizer, [prompts[i] for i in picked], max_new_tokens
                )
            for i, answer in zip(picked, answers):
                pinned[i] = answer
    result = {"per_token": _family_scores(rows, per_token), "cluster": _family_scores(rows, pinned)}
    if trained.config.heads > 1:
        with torch.no_grad():
            result["diagnostics"] = diagnose(trained, hydra_layers(trained.model), rows)
    return result


def _family_scores(rows: list[dict], answers: list[str]) -> dict[str, float]:
    correct: dict[str, list[bool]] = {}
    for row, answer in zip(rows, answers):
        correct.setdefault(row["task"], []).append(answer == row["messages"][-1]["content"].strip())
    scores = {family: sum(v) / len(v) for family, v in sorted(correct.items())}
    scores["all"] = sum(sum(v) for v in correct.values()) / len(rows)
    return scores


def diagnose(trained, layers: dict, rows: list[dict], batch_size: int = 16) -> dict:
    """How an adapter uses its heads, on the rows' prompt tokens: the router's mean mix per task
    family, the routing spread (total variation between each family's mix and the overall mix,
    averaged over families; `routing_spread` on the mix averaged over modules, as earlier
    results were reported, and `module_spread` per module, then averaged), the largest share of
    tokens one head wins (per module, averaged) and the heads' mean pairwise cosine similarity."""
    import torch

    from hydra_edge.adapter.gates import head_cosine, routing_spread
    from hydra_edge.adapter.switches import capture_gates
    from hydra_edge.data.records import prompt_ids

    device = next(trained.model.parameters()).device
    pad = trained.tokenizer.pad_token_id or 0
    sums: dict[str, torch.Tensor] = {}  # family -> (M, N) summed over its rows' mean gates
    counts: dict[str, int] = {}
    wins = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = [prompt_ids(trained.tokenizer, row["messages"][:-1]) for row in chunk]
        width = max(map(len, ids))
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)  # (B, T)
        padded = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)
        with capture_gates(trained.model) as sinks:
            trained.model(input_ids=padded, attention_mask=mask, use_cache=False, logits_to_keep=1)
        gates = torch.stack([sinks[name][-1].float() for name in layers], dim=1)  # (B, M, T, N)
        real = mask[:, None, :, None].float()  # (B, 1, T, 1)
        row_mix = (gates * real).sum(2) / real.sum(2)  # (B, M, N)
        for row, mix in zip(chunk, row_mix):
            sums[row["task"]] = sums.get(row["task"], 0) + mix.cpu()
            counts[row["task"]] = counts.get(row["task"], 0) + 1
        top = (gates == gates.max(-1, keepdim=True).values).float()  # (B, M, T, N); a tie splits the win
        won = top / top.sum(-1, keepdim=True) * real  # (B, M, T, N)
        wins = wins + won.sum(dim=(0, 2)).cpu()  # (M, N)
    per_family = {family: sums[family] / counts[family] for family in sorted(sums)}  # each (M, N)
    by_module = torch.stack(list(per_family.values()), dim=1)  # (M, F, N)
    return {
        "gate_mix": {family: [round(float(g), 3) for g in mix.mean(0)] for family, mix in per_family.items()},
        "routing_spread": routing_spread(by_module.mean(0)),
        "module_spread": statistics.fmean(routing_spread(families) for families in by_module),
        "head_cosine": statistics.fmean(head_cosine(layer.hydra_B) for layer in layers.values()),
        "top_head_share": float((wins.max(-1).values / wins.sum(-1)).mean()),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sweep", nargs="*", default=["lora"], help="variants whose lr is picked on validation")
    parser.add_argument("--lrs", type=float, nargs="+", help="the sweep (default: per model)")
    parser.add_argument("--lr", type=float, help="the lr of the variants not swept (default: per model)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--finetune-args", default="", help="more finetune flags for every run, one string")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, default=Path("bench-out/quality.json"))
    parser.add_argument("--png", type=Path, default=Path("bench-out/quality.png"))
    parser.add_argument("--work", type=Path, help="where the runs live (default bench-out/quality-<model>)")
    return parser.parse_args()


def run_variant(args, work: Path, variant: str, flags: list[str], lrs: list[float], test_rows: list[dict]) -> dict:
    """One variant: its lr picked on validation at the first seed (when swept), then every seed
    trained and scored on the test split."""
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
            scores_file.write_text(json.dumps(score_run(out, test_rows, args.max_new_tokens)))
        per_seed.append(json.loads(scores_file.read_text()))
    return {
        "flags": VARIANTS[variant],
        "lr": best_lr,
        "validation_sweep": {f"{lr:g}": v[0] for lr, v in sweep.items()},
        "trainable_params": trainable_params(work / f"{variant}-lr{best_lr:g}-seed{args.seeds[0]}"),
        "per_seed": per_seed,
    }


def main() -> None:
    args = parse_args()
    lrs = args.lrs or DEFAULT_LRS.get(args.model, [1e-4, 3e-4, 1e-3])
    fixed_lr = args.lr or DEFAULT_LR.get(args.model, 3e-4)

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

    # The reference HydraLoRA at the first seed fixes N and the parameter budget (and is reused
    # as that variant's run).
    probe = work / f"hydra-lr{fixed_lr:g}-seed{args.seeds[0]}"
    hydra_shape = ["--heads", "auto", "--rank", str(args.rank), "--alpha", f"{alpha_per_rank * args.rank:g}"]
    finetune(probe, [*common, *hydra_shape, *VARIANTS["hydra"], "--lr", f"{fixed_lr:g}", "--seed", str(args.seeds[0])])
    heads = AdapterConfig.load(probe).heads
    lora_rank, _ = matched_rank(probe)
    lora_shape = ["--rank", str(lora_rank), "--alpha", f"{alpha_per_rank * lora_rank:g}"]
    fixed_heads = ["--heads", str(heads), "--rank", str(args.rank), "--alpha", f"{alpha_per_rank * args.rank:g}"]

    results = {}
    for variant in args.variants:
        shape = lora_shape if variant == "lora" else (hydra_shape if variant == "hydra" else fixed_heads)
        lr_choices = lrs if variant in args.sweep else [fixed_lr]
        results[variant] = run_variant(
            args, work, variant, [*common, *shape, *VARIANTS[variant]], lr_choices, test_rows
        )
        results[variant]["heads"] = 1 if variant == "lora" else heads
        results[variant]["rank"] = lora_rank if variant == "lora" else args.rank

    budget = results["hydra"]["trainable_params"] if "hydra" in results else None
    for variant, result in results.items():
        result["params_vs_hydra"] = result["trainable_params"] / budget if budget else None
        if variant == "lora" and budget:
            assert abs(result["params_vs_hydra"] - 1) <= 0.05, (variant, result["params_vs_hydra"])
    _summarise(results)
    _print_and_save(args, results)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(results: dict) -> None:
    """Mean and standard deviation over seeds of every score and diagnostic, per variant."""
    for result in results.values():
        seeds = result["per_seed"]
        for kind in ("per_token", "cluster"):
            columns = seeds[0][kind]
            result[kind] = {c: _mean_std([100 * s[kind].get(c, 0.0) for s in seeds]) for c in columns}
        if "diagnostics" in seeds[0]:
            result["health"] = {
                key: _mean_std([s["diagnostics"][key] for s in seeds])
                for key in ("routing_spread", "module_spread", "head_cosine", "top_head_share")
            }


def _print_and_save(args, results: dict) -> None:
    columns = [*FAMILIES, "all"]
    print(
        f"\nmodel {args.model}, {args.steps} steps, seeds {args.seeds}; test exact-match %, per-token router, "
        "mean ± standard deviation over seeds"
    )
    print(f"{'variant':<10} {'heads':>5} {'r':>3} {'params':>9} {'lr':>7} " + " ".join(f"{c[:9]:>11}" for c in columns))
    for variant, result in results.items():
        cells = [f"{result['per_token'][c][0]:5.1f}±{result['per_token'][c][1]:<4.1f}" for c in columns]
        print(
            f"{variant:<10} {result['heads']:>5} {result['rank']:>3} {result['trainable_params']:>9,} "
            f"{result['lr']:>7g} " + " ".join(f"{c:>11}" for c in cells)
        )
    print("\nall families: per-token router vs the cluster mean gates an `adapters` export serves; head use")
    print(f"{'variant':<10} {'per-token':>12} {'export':>12} {'kept':>6} {'spread':>13} {'cosine':>13} {'top head':>9}")
    for variant, result in results.items():
        token, export = result["per_token"]["all"], result["cluster"]["all"]
        kept = export[0] / token[0] if token[0] else float("nan")
        health = result.get("health")
        spread = f"{health['routing_spread'][0]:.3f}±{health['routing_spread'][1]:.3f}" if health else "-"
        cosine = f"{health['head_cosine'][0]:.2f}±{health['head_cosine'][1]:.2f}" if health else "-"
        top = f"{health['top_head_share'][0]:.2f}" if health else "-"
        print(
            f"{variant:<10} {token[0]:6.1f}±{token[1]:<4.1f} {export[0]:6.1f}±{export[1]:<4.1f} {kept:6.0%} "
            f"{spread:>13} {cosine:>13} {top:>9}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"model": args.model, "steps": args.steps, "seeds": args.seeds, "results": results}, indent=2) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(results)
    for i, (variant, result) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(
            xs,
            [result["per_token"][c][0] for c in columns],
            width,
            yerr=[result["per_token"][c][1] for c in columns],
            label=f"{variant} (lr {result['lr']:g})",
            capsize=2,
        )
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(columns))], columns, rotation=20)
    ax.set_ylabel("test exact-match %")
    ax.set_title(f"{args.model}: {args.steps} steps, seeds {args.seeds}, matched parameters")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
