"""Per-cluster mean gates: what export merges the heads with.

For cluster c and module m, ḡ_{c,m} is the router's softmax averaged over every real
(non-padding) token of cluster c's training samples, in eval mode (no dropout).

    <out>/cluster_gates.safetensors   "cluster.<c>.<module>" -> [N] float32
                                      metadata: k, tokens per cluster
"""

from __future__ import annotations

import json
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
    layers = hydra_layers(model)
    by_cluster: dict[int, list[Sample]] = {c: [] for c in range(num_clusters)}
    for s in samples:
        if len(by_cluster[s.cluster]) < per_cluster:
            by_cluster[s.cluster].append(s)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {(c, name): torch.zeros(layer.num_heads) for c in by_cluster for name, layer in layers.items()}
    counts = [0] * num_clusters
    try:
        with capture_gates(model) as sinks:
            for c, group in by_cluster.items():
                for i in range(0, len(group), batch_size):
                    batch = collate(group[i : i + batch_size], pad_id)
                    mask = batch["attention_mask"].to(device)  # (B, T)
                    for sink in sinks.values():
                        sink.clear()
                    # Only the gates matter: skip the (B, T, vocab) logits.
                    model(
                        input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False, logits_to_keep=1
                    )
                    counts[c] += int(mask.sum())
                    if progress is not None:
                        progress.update(mask.shape[0], int(mask.sum()))
                    for name in layers:
                        gates = sinks[name][-1]  # (B, T, N)
                        sums[(c, name)] += (gates * mask.unsqueeze(-1)).sum(dim=(0, 1)).float().cpu()
    finally:
        model.train(was_training)
    gates = {f"cluster.{c}.{name}": (sums[(c, name)] / max(counts[c], 1)).contiguous() for c, name in sums}
    return gates, counts


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
