"""One micro-batch's losses: the LM loss, and the router losses with the switches that collect them.

Which steps pool their gates and how strongly the router losses weigh are decided by the step
number alone, so a resumed run makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hydra_edge.adapter.switches import pooled_gates, router_balance, router_targets, training_switches_paused
from hydra_edge.data.records import IGNORE_INDEX
from hydra_edge.models.lm_head import mean_label_loss


def is_pooled_step(step: int, share: float) -> bool:
    """Whether optimizer step `step` trains with pooled gates: a `share` of steps, evenly spread,
    decided by the step number alone (so a resumed run makes the same choices)."""
    return math.floor((step + 1) * share) > math.floor(step * share)


def pooling_groups(batch: dict, pool_over: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a pooled step averages each token's gates over: (groups (B, T) long, ids unique
    across the batch, -1 on padding; sources (B, T) bool, the tokens the mean is taken over).

    sample: every token of its sample (the answer's tokens too, so a token sees a summary of
    the tokens after it, which no export does); prompt: the prompt tokens of its sample (what
    the request router sees); cluster: every token in the micro-batch of its data cluster (a
    batch estimate of the cluster mean gates an export serves)."""
    segments, clusters = batch["segment_ids"], batch["cluster_ids"]  # (B, T) each
    real = segments >= 0
    if pool_over == "cluster":
        return clusters, real
    row_offset = torch.arange(segments.shape[0], device=segments.device).unsqueeze(1) * segments.shape[1]
    groups = torch.where(real, segments + row_offset, -1)  # (B, T): one id per sample in the batch
    sources = real & (batch["labels"] == IGNORE_INDEX) if pool_over == "prompt" else real
    return groups, sources


def router_weight_factor(step: int, total_steps: int, schedule: str) -> float:
    """What the router losses' weights are multiplied by at optimizer step `step` (0-based):
    constant 1, or linear from 1 at the first step to 0 at the last (the router is steered
    early and left to the LM loss by the end)."""
    if schedule == "linear":
        return max(0.0, 1.0 - step / max(1, total_steps))
    return 1.0


@contextmanager
def micro_batch_switches(
    model, batch: dict, pooled: bool, pool_over: str, router_weight: float, balance_weight: float = 0.0
) -> Iterator[tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor]]]:
    """The HydraLoRA switches of one micro-batch: pooled gates on a pooled step, router targets
    when the router loss is on, the balance loss when it is on. Takes the batch's cluster and
    segment ids out (the model does not read them) and yields the two lists the router losses
    collect in. Keep it open through backward: gradient checkpointing replays the forward there
    (hydra_edge/adapter/switches.py)."""
    groups = pooling_groups(batch, pool_over) if pooled else None
    cluster_ids = batch.pop("cluster_ids", None)
    segments = batch.pop("segment_ids", None)
    real = segments >= 0 if balance_weight > 0 and segments is not None else None
    with (
        pooled_gates(model, groups),
        router_targets(model, cluster_ids if router_weight > 0 else None) as supervised,
        router_balance(model, real) as balance,
    ):
        yield supervised, balance


def compute_loss(
    model, batch: dict, collected: tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LM loss, router loss, balance loss) of one micro-batch, inside its micro_batch_switches.

    The LM loss is the mean cross-entropy over the label tokens (HF shifts the labels). The
    router loss is the mean, over every HydraLoRA layer and real token, of -log(gate of the
    token's cluster head), from what the layers appended; zero when the router loss is off or
    the batch has no cluster_ids. The balance loss is the mean over layers of what each
    appended (adapter.layer.HydraLoRALinear._balance_router), in [-1, 1]; zero when off.
    """
    router_losses, balance_losses = collected
    loss = mean_label_loss(model, batch, training_switches_paused)
    zero = torch.zeros((), device=loss.device)
    router_loss = zero
    if router_losses:
        nll = sum(n for n, _ in router_losses)
        router_loss = nll / max(1, sum(c for _, c in router_losses))
    balance = torch.stack(balance_losses).mean() if balance_losses else zero
    return loss, router_loss, balance
