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
import torch.nn.functional as F

from hydra_edge.adapter.inject import hydra_layers
from hydra_edge.adapter.layer import gate_entropy
from hydra_edge.adapter.switches import capture_gates
from hydra_edge.data.records import Sample, collate
from hydra_edge.errors import UserError
from hydra_edge.files import save_tensors
from hydra_edge.progress import PhaseProgress

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
    heads = {name: layer.heads for name, layer in hydra_layers(model).items()}
    gates = {
        f"cluster.{c}.{name}": (sums.get((c, name), torch.zeros(n)) / max(counts[c], 1)).contiguous()
        for c in by_cluster
        for name, n in heads.items()
    }
    return gates, counts


def router_health(model, samples: list[Sample], pad_id: int, batch_size: int = 16) -> dict[str, dict]:
    """{module: {"gate_entropy", "head_share", "head_cosine", "routing_spread"}} over every real
    token of `samples` (unpacked: the gate pass reads their attention mask). A router that
    collapsed onto one head, or never left uniform, shows in the first two; heads that trained
    alike (HydraLoRA then costs N LoRAs and works as one) in the last two:

    gate_entropy    the gates' entropy as a share of its maximum log N (0: one head takes every
                    token, 1: all weigh the same);
    head_share      the share of tokens each head wins (its gate is the largest);
    head_cosine     the mean pairwise cosine similarity of the B heads (1: one head N times);
                    None with one head;
    routing_spread  how differently the samples' data clusters (Sample.cluster) are routed: the
                    mean over clusters of the total variation between the cluster's mean gates
                    and the mean of all clusters' means (0: every cluster gets the same mix);
                    None with fewer than two clusters."""
    clusters = torch.tensor([s.cluster for s in samples], dtype=torch.long)  # (S,)
    num_clusters = int(clusters.max()) + 1 if len(samples) else 0
    tallies: dict[str, _GateTally] = {}
    cluster_tokens = torch.zeros(num_clusters)  # (C,)
    offset = 0
    for mask, gates_by_module in _gates_by_batch(model, samples, pad_id, batch_size, None):
        real = mask.bool().cpu()  # (B, T)
        rows = clusters[offset : offset + real.shape[0]]  # (B,)
        offset += real.shape[0]
        members = F.one_hot(rows.unsqueeze(1).expand_as(real)[real], num_clusters).float()  # (n, C)
        cluster_tokens += members.sum(dim=0)
        for name, gates in gates_by_module.items():
            tallies.setdefault(name, _GateTally()).add(gates.cpu()[real].float(), members)  # (n, N), (n, C)
    layers = hydra_layers(model)
    return {name: tally.health(layers[name].hydra_B, cluster_tokens) for name, tally in tallies.items()}


class _GateTally:
    """One module's running sums over the gate pass's batches."""

    def __init__(self) -> None:
        self.entropy = 0.0  # summed per-token entropy
        self.wins: torch.Tensor | float = 0  # (N,) tokens each head wins
        self.by_cluster: torch.Tensor | float = 0  # (C, N) summed gates of each cluster's tokens

    def add(self, gates: torch.Tensor, members: torch.Tensor) -> None:
        """gates (n, N) of n real tokens, members (n, C) their one-hot clusters."""
        self.entropy += float(gate_entropy(gates).sum())
        self.wins = self.wins + torch.bincount(gates.argmax(dim=-1), minlength=gates.shape[-1])
        self.by_cluster = self.by_cluster + members.T @ gates  # (C, N)

    def health(self, heads: torch.Tensor, cluster_tokens: torch.Tensor) -> dict:
        """router_health's entry for this module. heads (N, out, r), cluster_tokens (C,)."""
        tokens = max(float(cluster_tokens.sum()), 1.0)
        n = len(self.wins)
        seen = cluster_tokens > 0  # (C,): clusters with a real token among the samples
        return {
            "gate_entropy": self.entropy / tokens / (math.log(n) if n > 1 else 1.0),
            "head_share": [float(w) / tokens for w in self.wins],
            "head_cosine": head_cosine(heads),
            "routing_spread": routing_spread(self.by_cluster[seen] / cluster_tokens[seen].unsqueeze(-1)),
        }


@torch.no_grad()
def head_cosine(heads: torch.Tensor) -> float | None:
    """The mean pairwise cosine similarity of the B heads, each flattened: near 1 when training
    moved them together (the symmetry adapter/layer.py describes), None with one head. A zero head
    (head_init zero, before any step) counts as unlike every other. heads (N, out, r)."""
    n = heads.shape[0]
    if n < 2:
        return None
    flat = F.normalize(heads.detach().float().flatten(1), dim=1)  # (N, out·r)
    similarity = flat @ flat.T  # (N, N)
    pairs = torch.triu_indices(n, n, offset=1)  # (2, N(N-1)/2)
    return float(similarity[pairs[0], pairs[1]].mean())


def routing_spread(cluster_means: torch.Tensor) -> float | None:
    """The mean over clusters of the total variation 0.5·Σ|g_c - ḡ| between each cluster's mean
    gates g_c and their mean ḡ: 0 when the router gives every cluster the same mix (it then
    routes nothing the data's clusters tell apart); 1 - 1/C when each cluster has a head of its own.
    None with fewer than two clusters. cluster_means (C, N)."""
    if cluster_means.shape[0] < 2:
        return None
    overall = cluster_means.mean(dim=0, keepdim=True)  # (1, N)
    return float(0.5 * (cluster_means - overall).abs().sum(dim=-1).mean())


def router_summary(health: dict[str, dict]) -> dict:
    """router_health averaged over modules, what a person watching the run reads: routing_spread
    and head_cosine (each over the modules that have one; None if none has), max_head_share (each
    module's largest head share: near 1 when one head takes every token) and head_share (head i's
    share in every module, averaged: a rough picture, as head i of one module need not serve the
    tokens head i of another does)."""

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    modules = list(health.values())
    shares = [m["head_share"] for m in modules]
    return {
        "routing_spread": mean([m.get("routing_spread") for m in modules]),
        "head_cosine": mean([m.get("head_cosine") for m in modules]),
        "max_head_share": mean([max(s) if s else None for s in shares]),
        "head_share": [mean(list(per_head)) for per_head in zip(*shares)] if shares else [],
    }


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
    from hydra_edge.adapter.config import AdapterConfig

    config = AdapterConfig.load(adapter_dir)
    per_cluster: dict[int, dict[str, torch.Tensor]] = {}
    gates_file = load_cluster_gates(adapter_dir, config.target_modules, config.heads, config.heads)
    for key, gates in gates_file.items():
        _, cluster, module = key.split(".", 2)  # "cluster.<c>.<module>"
        per_cluster.setdefault(int(cluster), {})[module] = gates.float()
    return dict(sorted(per_cluster.items()))
