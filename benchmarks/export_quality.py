"""What a per-cluster export keeps of the per-token model, for several training settings.

A per-cluster export (`adapters`/`merged`) gives every token of a request the same gates: its
cluster's mean gates ḡ_c. For each (--pooled-steps, --router-loss, --pool-over) setting and
seed this trains the tiny preset on the demo data, then scores the held-out split greedily in PyTorch three ways:
per-token router (what `dynamic` exports), fixed ḡ_c of the routed cluster (what `adapters` and
`merged` export; the fp32 ONNX models match it within 1e-3 in logits), and the routed cluster's
head alone (one-hot gates). Prints a table and writes JSON.

    python benchmarks/export_quality.py                                  # 0:0 0.5:0 0.5:0.1, ~4 min on 2 cores
    python benchmarks/export_quality.py --runs 0.5:0:sample 0.5:0:cluster --seeds 42 1 2
    python benchmarks/export_quality.py --finetune-args "--quant none --mixed-precision no"  # fast fp32
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from report import save_json  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def score(adapter_dir: Path, max_new_tokens: int) -> dict:
    import torch

    from hydra_edge.adapter.gates import load_cluster_gates
    from hydra_edge.adapter.inject import hydra_layers
    from hydra_edge.adapter.switches import fixed_gates
    from hydra_edge.data.records import read_records
    from hydra_edge.inference.trained import generate_greedy, load_trained
    from hydra_edge.models.tiny import DEMO_EVAL

    trained = load_trained(adapter_dir)
    records = read_records(DEMO_EVAL)
    routed = trained.clusters.assign([r.prompt_text for r in records]).tolist()
    mean_gates = load_cluster_gates(adapter_dir)
    layers = hydra_layers(trained.model)
    rows_by_cluster: dict[int, list[int]] = {}
    for i, cluster in enumerate(routed):
        rows_by_cluster.setdefault(cluster, []).append(i)

    def gates_for(kind: str, cluster: int, name: str, layer):
        if kind == "per-token router":
            return None
        if kind == "cluster mean gates":
            return mean_gates[f"cluster.{cluster}.{name}"]
        return torch.nn.functional.one_hot(torch.tensor(cluster), layer.heads).float()

    result = {}
    for kind in ("per-token router", "cluster mean gates", "cluster head alone"):
        correct = 0
        for cluster, rows in rows_by_cluster.items():
            gates = {name: gates_for(kind, cluster, name, layer) for name, layer in layers.items()}
            with fixed_gates(trained.model, gates):
                answers = generate_greedy(
                    trained.model, trained.tokenizer, [records[i].messages[:-1] for i in rows], max_new_tokens
                )
            correct += sum(a == records[i].reference_answer.strip() for i, a in zip(rows, answers))
        result[kind] = correct / len(records)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["0:0", "0.5:0", "0.5:0.1"],
        help="POOLED_STEPS:ROUTER_LOSS[:POOL_OVER] settings (POOL_OVER defaults to the finetune default)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--finetune-args", default="", help="more finetune flags for every run, one string")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("bench-out/export_quality.json"))
    args = parser.parse_args()

    table = []
    with tempfile.TemporaryDirectory(prefix="export-quality-") as tmp:
        for spec in args.runs:
            pooled, router, *pool_over = spec.split(":")
            for seed in args.seeds:
                out = Path(tmp) / f"{spec.replace(':', '_')}-{seed}"
                cmd = [
                    sys.executable,
                    "-m",
                    "hydra_edge",
                    "finetune",
                    "--out",
                    str(out),
                    "--seed",
                    str(seed),
                    "--pooled-steps",
                    pooled,
                    "--router-loss",
                    router,
                    *(["--pool-over", *pool_over] if pool_over else []),
                    *shlex.split(args.finetune_args),
                ]
                print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                row = {
                    "pooled_steps": float(pooled),
                    "router_loss": float(router),
                    "pool_over": pool_over[0] if pool_over else "default",
                    "seed": seed,
                    **score(out, args.max_new_tokens),
                }
                row["kept"] = row["cluster mean gates"] / max(row["per-token router"], 1e-9)
                table.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"{'pooled':>6} {'router':>6} {'pool over':>9} {'seed':>4} {'per-token EM':>13} {'mean-gates EM':>14} "
        f"{'kept':>6} {'head-alone EM':>14}"
    )
    for row in table:
        print(
            f"{row['pooled_steps']:>6g} {row['router_loss']:>6g} {row['pool_over']:>9} {row['seed']:>4} "
            f"{100 * row['per-token router']:>12.1f}% {100 * row['cluster mean gates']:>13.1f}% "
            f"{100 * row['kept']:>5.0f}% {100 * row['cluster head alone']:>13.1f}%"
        )
    save_json(args.json, table)


if __name__ == "__main__":
    main()
