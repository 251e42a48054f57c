"""One optimizer step's forward and backward passes over its `grad_accum` micro-batches, and the
step's gradient norm: what the loop needs to decide whether the step is applied or skipped.

Each micro-batch's mean loss is weighted by its share of the step's target tokens, so the step's
loss is the mean over all its tokens however they fall into batches, and with several processes
every one of them sees the same losses (so all skip a bad step together).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hydra_edge.data.records import IGNORE_INDEX, Sample, collate
from hydra_edge.training.losses import compute_loss, micro_batch_switches


@dataclass(frozen=True)
class StepSwitches:
    """What one optimizer step trains with: pooled gates or not, and the router losses' weights."""

    pooled: bool
    pool_over: str
    router_weight: float
    balance_weight: float


@dataclass(frozen=True)
class StepLosses:
    """The step's losses, token-weighted means over its micro-batches (averaged over processes),
    and the tokens it read (summed over processes)."""

    loss: float
    router_loss: float
    balance: float
    tokens: int


def forward_backward(accelerator, model, groups: list[list[Sample]], pad_id: int, switches: StepSwitches) -> StepLosses:
    """Runs forward and backward on each micro-batch of the step, gradients accumulating; the
    processes synchronise theirs on the last micro-batch only."""
    device, world = accelerator.device, accelerator.num_processes
    tokens = sum(len(s.input_ids) for group in groups for s in group)
    micro_batches = [collate(group, pad_id, with_clusters=True) for group in groups]
    targets = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
    total_targets = max(1, sum(targets))
    step_loss = torch.zeros((), device=device)
    step_router_loss = torch.zeros((), device=device)
    step_balance = torch.zeros((), device=device)
    router_weight, balance_weight = switches.router_weight, switches.balance_weight
    for micro, (batch, n_targets) in enumerate(zip(micro_batches, targets)):
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = micro == len(micro_batches) - 1
        share = n_targets / total_targets
        with (
            micro_batch_switches(
                model, batch, switches.pooled, switches.pool_over, router_weight, balance_weight
            ) as collected,
            accelerator.autocast(),
            accelerator.no_sync(model) if not sync and world > 1 else nullcontext(),
        ):
            lm_loss, router_loss, balance = compute_loss(model, batch, collected)
            accelerator.backward((lm_loss + router_weight * router_loss + balance_weight * balance) * share)
        step_loss = step_loss + lm_loss.detach().float() * share
        step_router_loss = step_router_loss + router_loss.detach().float() * share
        step_balance = step_balance + balance.detach().float() * share
    if world > 1:  # every process must see the same loss, so all skip a bad step together
        step_loss = accelerator.reduce(step_loss, reduction="mean")
        step_router_loss = accelerator.reduce(step_router_loss, reduction="mean")
        step_balance = accelerator.reduce(step_balance, reduction="mean")
        tokens = int(accelerator.reduce(torch.tensor(tokens, device=device), reduction="sum"))
    return StepLosses(float(step_loss), float(step_router_loss), float(step_balance), tokens)


def gradient_norm(accelerator, params: list[torch.Tensor], max_grad_norm: float) -> float:
    """The step's gradient norm, clipped to max_grad_norm (0: measured, not clipped)."""
    if max_grad_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_grad_norm))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
