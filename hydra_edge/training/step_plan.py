"""How long a run is: its optimizer steps and its warmup steps, worked out once from the data and
the settings (what the loop needs beyond FinetuneConfig itself)."""

from __future__ import annotations

from dataclasses import dataclass

from hydra_edge.training.batches import steps_for
from hydra_edge.training.config import FinetuneConfig


@dataclass(frozen=True)
class StepPlan:
    """The run's length in optimizer steps, and how many of them warm the learning rate up."""

    total_steps: int
    warmup_steps: int


def plan_steps(config: FinetuneConfig, num_rows: int, num_processes: int) -> StepPlan:
    """--max-steps, or the steps that make --epochs passes over `num_rows` training rows split across
    the processes; --warmup is a share of those steps below 1, else a number of steps."""
    total = config.max_steps or steps_for(num_rows, config.batch_size, config.grad_accum, config.epochs, num_processes)
    warmup = int(config.warmup * total) if config.warmup < 1 else int(config.warmup)
    return StepPlan(total_steps=total, warmup_steps=warmup)
