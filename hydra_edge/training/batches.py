"""The data order: which samples each micro-batch of each optimizer step holds, on each process.

The order is a pure function of (seed, epoch), so the data position is just the step number and a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math

import torch

from hydra_edge.data.records import Sample


def steps_for(num_samples: int, batch_size: int, grad_accum: int, epochs: float, num_processes: int = 1) -> int:
    """Optimizer steps that make `epochs` passes over the data (micro-batches cut as epoch_batches cuts them)."""
    per_process = math.ceil(num_samples / num_processes)
    micro_batches_per_epoch = math.ceil(per_process / batch_size)
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum))


def epoch_batches(
    samples: list[Sample], epoch: int, seed: int, batch_size: int, rank: int, world: int
) -> list[list[Sample]]:
    """This process's micro-batches for one epoch: a seeded permutation, sharded by rank."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(samples), generator=generator).tolist()
    mine = [samples[i] for i in order[rank::world]]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class StepBatches:
    """This process's micro-batches, step by step: the step number says which epoch each of its
    `grad_accum` micro-batches falls in and where; one epoch's order is kept at a time, so a step
    that crosses into the next epoch draws that epoch's permutation once."""

    def __init__(self, samples: list[Sample], seed: int, batch_size: int, grad_accum: int, rank: int, world: int):
        self.samples, self.seed, self.batch_size, self.grad_accum = samples, seed, batch_size, grad_accum
        self.rank, self.world = rank, world
        first = epoch_batches(samples, 0, seed, batch_size, rank, world)
        self.per_epoch = len(first)  # micro-batches in an epoch
        self._cached = {0: first}

    def for_step(self, step: int) -> list[list[Sample]]:
        """The micro-batches of optimizer step `step` (0-based), in order."""
        groups = []
        for micro in range(self.grad_accum):
            epoch, within = divmod(step * self.grad_accum + micro, self.per_epoch)
            if epoch not in self._cached:
                self._cached.clear()
                self._cached[epoch] = epoch_batches(
                    self.samples, epoch, self.seed, self.batch_size, self.rank, self.world
                )
            groups.append(self._cached[epoch][within])
        return groups

    def epochs_done(self, steps: int) -> float:
        """Passes over the data that `steps` optimizer steps make (the metrics row's `epoch`)."""
        return (steps * self.grad_accum) / self.per_epoch
