"""Per-cluster mean gates: what export merges the heads with.

For cluster c and module m, ḡ_{c,m} is the router's softmax averaged over every real
(non-padding) token of cluster c's training samples, in eval mode (no dropout).

    <out>/cluster_gates.safetensors   "cluster.<c>.<module>" -> [N] float32
                                      metadata: k, tokens per cluster
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from hydra_edge.adapter import hydra_layers
from hydra_edge.data import Sample, collate
from hydra_edge.errors import UserError
from hydra_edge.files import save_tensors
from hydra_edge.progress import PhaseProgress
from hydra_edge.switches import capture_gates

GATES_FILE = "cluster_gates.safetensors"


@torch.no_grad()
def _gates_by_batch(model, samples: list[Sample], pad_id: int, batch_size: int, progress: PhaseProgress | None):
    """(mask (B, T), {module: gates (B, T, N) float32}) for each batch of samples, in eval mode."""
    layers = hydra_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_gates(model) as sinks:
            for i in range(0, len(samples), batch_size):
                batch = collate(samples[i : i + batch_size], pad_id)
                mask = batch["attention_mask"].to(device)  # (B, T)
                for sink in sinks.values():
                    sink.clear()
                # Only the gates matter: skip the (B, T, vocab) logits.
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False, logits_to_keep=1)
                if progress is not None:
                    progress.update(mask.shape[0], int(mask.sum()))
                yield mask, {name: sinks[name][-1] for name in layers}
    finally:
        model.train(was_training)


def mean_gates_per_cluster(
    model,
    samples: list[Sample],
    num_clusters: int,
    pad_id: int,
    per_cluster: int,
    batch_size: int = 16,
    progress: PhaseProgress | None = None,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """{"cluster.<c>.<module>": [N]} and the token count behind each cluster."""
    by_cluster: dict[int, list[Sample]] = {c: [] for c in range(num_clusters)}
    for s in samples:
        if len(by_cluster[s.cluster]) < per_cluster:
            by_cluster[s.cluster].append(s)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts = [0] * num_clusters
    for c, group in by_cluster.items():
        for mask, gates_by_module in _gates_by_batch(model, group, pad_id, batch_size, progress):
            counts[c] += int(mask.sum())
            for name, gates in gates_by_module.items():  # (B, T, N)
                total = (gates * mask.unsqueeze(-1)).sum(dim=(0, 1)).float().cpu()
                sums[(c, name)] = sums.get((c, name), 0) + total
    heads = {name: layer.num_heads for name, layer in hydra_layers(model).items()}
    gates = {
        f"cluster.{c}.{name}": (sums.get((c, name), torch.zeros(n)) / max(counts[c], 1)).contiguous()
        for c in by_cluster
        for name, n in heads.items()
    }
    return gates, counts


def router_health(model, samples: list[Sample], pad_id: int, batch_size: int = 16) -> dict[str, dict]:
    """{module: {"gate_entropy", "head_share"}} over every real token of `samples`: the gates'
    entropy as a share of its maximum log N (0: one head takes every token, 1: all weigh the
    same), and the share of tokens each head wins (its gate is the largest). A router that
    collapsed onto one head, or never left uniform, shows here."""
    entropy: dict[str, float] = {}
    wins: dict[str, torch.Tensor] = {}
    tokens = 0
    for mask, gates_by_module in _gates_by_batch(model, samples, pad_id, batch_size, None):
        real = mask.bool()  # (B, T)
        tokens += int(real.sum())
        for name, gates in gates_by_module.items():
            g = gates[real].float()  # (n, N)
            per_token = -(g * g.clamp_min(1e-12).log()).sum(dim=-1)  # (n,)
            entropy[name] = entropy.get(name, 0.0) + float(per_token.sum())
            won = torch.bincount(g.argmax(dim=-1), minlength=g.shape[-1]).cpu()
            wins[name] = wins.get(name, 0) + won
    health = {}
    for name, won in wins.items():
        heads = len(won)
        top = math.log(heads) if heads > 1 else 1.0
        health[name] = {
            "gate_entropy": entropy[name] / max(tokens, 1) / top,
            "head_share": [float(w) / max(tokens, 1) for w in won],
        }
    return health


def save_cluster_gates(out_dir: Path, gates: dict[str, torch.Tensor], token_counts: list[int]) -> None:
    meta = {"k": str(len(token_counts)), "tokens_per_cluster": json.dumps(token_counts)}
    save_tensors(gates, Path(out_dir) / GATES_FILE, metadata=meta)


def load_cluster_gates(
    out_dir: Path, modules: list[str] | None = None, heads: int | None = None, clusters: int | None = None
) -> dict[str, torch.Tensor]:
    """The saved mean gates; with the adapter's modules, head count and cluster count, checked
    to hold exactly one probability vector (N,) per cluster and module (a damaged file is one
    clear error, not a wrong export)."""
    from safetensors.torch import load_file

    path = Path(out_dir) / GATES_FILE
    remedy = "the run's per-cluster gates are damaged; restore the file or retrain"
    if not path.is_file():
        raise UserError(f"--adapter {out_dir}: {GATES_FILE} missing; the training run did not finish")
    try:
        gates = load_file(str(path))
    except Exception as exc:  # SafetensorError and friends: damaged or truncated file
        raise UserError(f"{path}: cannot be read ({exc}); {remedy}") from exc
    if modules is None:
        return gates
    expected = {f"cluster.{c}.{m}" for c in range(clusters) for m in modules}
    if set(gates) != expected:
        odd = sorted(set(gates) ^ expected)[0]
        raise UserError(f"{path}: does not hold one gate vector per cluster and module (e.g. {odd}); {remedy}")
    for key, value in gates.items():
        ok = (
            value.shape == (heads,)
            and value.is_floating_point()
            and bool(torch.isfinite(value).all())
            and bool((value >= 0).all())
            and abs(float(value.sum()) - 1.0) < 1e-3
        )
        if not ok:
            raise UserError(f"{path}: {key} is not a probability vector over {heads} heads; {remedy}")
    return gates


def cluster_gates(adapter_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """{cluster: {module: ḡ (N,)}} from cluster_gates.safetensors, checked against the adapter."""
    from hydra_edge.adapter_config import AdapterConfig

    config = AdapterConfig.load(adapter_dir)
    per_cluster: dict[int, dict[str, torch.Tensor]] = {}
    gates_file = load_cluster_gates(adapter_dir, config.target_modules, config.heads, config.heads)
    for key, gates in gates_file.items():
        _, cluster, module = key.split(".", 2)  # "cluster.<c>.<module>"
        per_cluster.setdefault(int(cluster), {})[module] = gates.float()
    return dict(sorted(per_cluster.items()))
