"""The training loop, readable top to bottom (torchtune-style), on `accelerate`.

One optimizer step = `grad_accum` micro-batches. The data order is a pure function of
(seed, epoch), so the data position is just the step number and a resumed run sees exactly
the batches an uninterrupted one would (batches.py). A step whose loss or gradient norm is not
finite is skipped (parameters unchanged); `max_bad_steps` of them in a row abort the run.

The loop reads its settings from the run's FinetuneConfig, and what follows from the data (the
run's length, its warmup) from a StepPlan. Its phases: set up the optimizer and schedule (from a
checkpoint on --resume); per step, forward and backward (optimizer_step.py), apply or skip,
write the metrics row, score the held-out rows when due, then stop, save or go on.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from hydra_edge.data.records import Sample
from hydra_edge.errors import TrainingDiverged, TrainingStopped
from hydra_edge.models.quant import check_4bit_backprop, prepare_4bit_for_training
from hydra_edge.training.batches import StepBatches
from hydra_edge.training.checkpoint import load_checkpoint, save_checkpoint
from hydra_edge.training.config import FinetuneConfig
from hydra_edge.training.held_out import EarlyStopping, HeldOut, heads_collapsed, save_best, tracker_values
from hydra_edge.training.losses import is_pooled_step, router_weight_factor
from hydra_edge.training.metrics_file import METRICS_FILE, start_metrics, tracked_values, write_row
from hydra_edge.training.optimizer_step import StepSwitches, forward_backward, gradient_norm
from hydra_edge.training.optimizers import build_optimizer, build_scheduler
from hydra_edge.training.progress_bar import ProgressBar, collapse_warning, eval_line
from hydra_edge.training.step_plan import StepPlan
from hydra_edge.training.tracking import PROJECT


@dataclass
class _Counters:
    """Where the run stands: the steps done, the skipped ones and early stopping's watch. A
    checkpoint keeps all but the last loss, so a resumed run goes on counting where it stopped."""

    stopping: EarlyStopping
    step: int = 0
    bad_in_a_row: int = 0
    skipped_total: int = 0
    last_loss: float = math.nan


@dataclass
class _Run:
    """What every phase of one run works on: the prepared model, its optimizer and schedule, the
    settings, and the counters."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    params: list[torch.Tensor]
    config: FinetuneConfig
    plan: StepPlan
    out_dir: Path
    counters: _Counters
    run_state: dict | None

    def save(self, step: int) -> Path:
        """Every process reaches this; only the main one writes (DDP replicas are identical)."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return self.out_dir / "checkpoints" / f"step-{step:06d}"
        trainer_state = {
            "bad_in_a_row": self.counters.bad_in_a_row,
            "skipped_total": self.counters.skipped_total,
            "early_stopping": self.counters.stopping.state(),
            **(self.run_state or {}),
        }
        model = self.accelerator.unwrap_model(self.model)
        return save_checkpoint(self.out_dir, step, model, self.optimizer, self.scheduler, trainer_state)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_loop(
    model,
    samples: list[Sample],
    config: FinetuneConfig,
    plan: StepPlan,
    out_dir: Path,
    pad_id: int,
    mixed_precision: str,
    resume_from: Path | None = None,
    run_state: dict | None = None,
    on_step=None,
    held_out: HeldOut | None = None,
    trackers: list | None = None,
    hparams: dict | None = None,
) -> dict:
    """Trains the model's trainable parameters in place; returns a summary.

    on_step(step, model, skipped) is called after every optimizer step (tests use it). With
    held_out, the held-out rows are scored every held_out.every steps (and early stopping, if
    set, keeps the best step's weights in <out>/best/); trackers (accelerate GeneralTrackers)
    get every row metrics.jsonl gets.
    """
    from accelerate import Accelerator

    _forget_previous_accelerator()
    accelerator = Accelerator(
        mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=list(trackers or []) or None
    )
    if trackers:
        accelerator.init_trackers(PROJECT, config=hparams)
    try:
        run = _prepare(accelerator, model, config, plan, out_dir, resume_from, run_state)
        return _train(run, samples, pad_id, on_step, held_out)
    finally:
        # With mixed precision, accelerate.prepare wraps the model's forward in autocast and
        # casts its outputs to float32. Left on, every later use (gate pass, eval, export)
        # would run a different computation than a freshly loaded adapter: unwrap it.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if trackers:
            accelerator.end_training()


def _prepare(
    accelerator,
    model,
    config: FinetuneConfig,
    plan: StepPlan,
    out_dir: Path,
    resume_from: Path | None,
    run_state: dict | None,
) -> _Run:
    """The optimizer and the schedule on the prepared model, and the counters: fresh, or the
    checkpoint's on --resume (with metrics.jsonl cut back to its step)."""
    prepare_4bit_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_scheduler, plan.warmup_steps, plan.total_steps, config.min_lr_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    counters = _Counters(EarlyStopping(config.early_stopping))
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        stopping = EarlyStopping.restore(config.early_stopping, state.get("early_stopping"))
        counters = _Counters(stopping, state["step"], state["bad_in_a_row"], state["skipped_total"])
    if accelerator.is_main_process:
        start_metrics(out_dir / METRICS_FILE, counters.step if resume_from is not None else None)
    accelerator.wait_for_everyone()
    return _Run(accelerator, model, optimizer, scheduler, params, config, plan, out_dir, counters, run_state)


def _train(run: _Run, samples: list[Sample], pad_id: int, on_step, held_out: HeldOut | None) -> dict:
    """The steps from where the run stands to its last (or to a stop), each logged before the next
    begins, then the final checkpoint; returns the run's summary."""
    accelerator, config, counters = run.accelerator, run.config, run.counters
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = StepBatches(samples, config.seed, config.batch_size, config.grad_accum, rank, world)
    run_start = time.perf_counter()
    bar = ProgressBar(run.plan.total_steps, counters.step, accelerator.is_main_process)
    with _StopFlag() as stop, open(run.out_dir / METRICS_FILE, "a", encoding="utf-8") as metrics:
        while counters.step < run.plan.total_steps:
            row = _train_step(run, batches, pad_id, run_start)
            if accelerator.is_main_process:
                write_row(metrics, row)
            accelerator.log(tracked_values(row), step=counters.step)
            bar.update(row)
            if on_step is not None:
                on_step(counters.step, accelerator.unwrap_model(run.model), row["skipped"])
            if held_out is not None and held_out.due(counters.step, run.plan.total_steps):
                _held_out_eval(run, held_out, metrics, bar)
            if _stop_or_save(run, stop, bar):
                break
    bar.close()
    final_checkpoint = run.save(counters.step)
    return {
        "steps": counters.step,
        "final_loss": counters.last_loss,
        "skipped_steps": counters.skipped_total,
        "train_time_s": time.perf_counter() - run_start,
        "checkpoint": str(final_checkpoint),
        "is_main_process": accelerator.is_main_process,
        "stopped_early": counters.stopping.should_stop,
        "best_step": counters.stopping.best_step,
    }


def _step_switches(step: int, config: FinetuneConfig, plan: StepPlan) -> StepSwitches:
    """What optimizer step `step` (0-based) trains with, from the step number alone, so a
    resumed run makes the same choices as an uninterrupted one."""
    factor = router_weight_factor(step, plan.total_steps, config.router_loss_schedule)
    return StepSwitches(
        pooled=is_pooled_step(step, config.pooled_steps),
        pool_over=config.pool_over,
        router_weight=config.router_loss * factor,
        balance_weight=config.router_balance * factor,
    )


def _train_step(run: _Run, batches: StepBatches, pad_id: int, run_start: float) -> dict:
    """One optimizer step: forward and backward over its micro-batches, then the update, or a
    skip when the loss or the gradient norm is not finite. Returns the step's metrics row."""
    accelerator, counters, step = run.accelerator, run.counters, run.counters.step
    run.model.train()
    # After any inference forward (an eval pass, the LM-head probe): hydra_edge/models/quant.py.
    check_4bit_backprop(accelerator.unwrap_model(run.model), f"before step {step + 1}")
    step_start = time.perf_counter()
    switches = _step_switches(step, run.config, run.plan)
    losses = forward_backward(accelerator, run.model, batches.for_step(step), pad_id, switches)
    grad_norm = gradient_norm(accelerator, run.params, run.config.max_grad_norm)
    skipped = not (math.isfinite(losses.loss) and math.isfinite(losses.router_loss) and math.isfinite(grad_norm))
    lr_now = run.scheduler.get_last_lr()[0]
    if skipped:
        counters.bad_in_a_row += 1
        counters.skipped_total += 1
    else:
        run.optimizer.step()
        counters.bad_in_a_row = 0
        counters.last_loss = losses.loss
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    counters.step += 1
    elapsed = time.perf_counter() - step_start
    row = {
        "step": counters.step,
        "total_steps": run.plan.total_steps,
        "loss": losses.loss,
        "router_loss": losses.router_loss,
        "router_balance": losses.balance,
        "lr": lr_now,
        "grad_norm": grad_norm,
        "tokens": losses.tokens,
        "tokens_per_s": losses.tokens / max(elapsed, 1e-9),
        "step_time_s": elapsed,
        "elapsed_s": time.perf_counter() - run_start,
        "epoch": batches.epochs_done(counters.step),
        "skipped": skipped,
    }
    if accelerator.device.type == "cuda":
        row["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return row


def _held_out_eval(run: _Run, held_out: HeldOut, metrics: TextIO, bar: ProgressBar) -> None:
    """Scores the held-out rows at this step: an eval row in metrics.jsonl and the trackers, its
    line on the bar (and a warning when the heads have collapsed), and with --early-stopping the
    best step's weights kept in <out>/best/."""
    accelerator, step, stopping = run.accelerator, run.counters.step, run.counters.stopping
    unwrapped = accelerator.unwrap_model(run.model)
    scores = {"step": step, **held_out.score(unwrapped)}
    scores["heads_collapsed"] = heads_collapsed(scores, run.plan.warmup_steps)
    best = stopping.update(step, scores["eval_loss"])
    if accelerator.is_main_process:
        write_row(metrics, scores)
        if best and run.config.early_stopping:
            save_best(run.out_dir, unwrapped, step, scores["eval_loss"])
        bar.note(eval_line(scores, stopping))
        if scores["heads_collapsed"]:
            bar.note(collapse_warning(scores))
    accelerator.log(tracker_values(scores), step=step)


def _stop_or_save(run: _Run, stop: _StopFlag, bar: ProgressBar) -> bool:
    """After a step: abort after max_bad_steps bad steps in a row, stop on a signal (every process
    together, with a checkpoint), end on early stopping (True), or save when one is due."""
    accelerator, counters, step = run.accelerator, run.counters, run.counters.step
    if counters.bad_in_a_row >= run.config.max_bad_steps:
        bar.close()
        raise TrainingDiverged(
            f"step {step}: {counters.bad_in_a_row} steps in a row had a non-finite loss or gradient; "
            "lower --lr or check the data (the last good checkpoint is kept)"
        )
    signum = stop.signum
    if accelerator.num_processes > 1:  # stop together, or one process would wait in save() while others train
        anyone = accelerator.reduce(torch.tensor(int(signum is not None), device=accelerator.device), reduction="sum")
        signum = signum or (signal.SIGTERM if int(anyone) else None)
    if signum is not None:
        bar.close()
        raise TrainingStopped(signum, step, run.save(step))
    stopping = counters.stopping
    if stopping.should_stop:
        bar.note(
            f"early stopping: held-out loss has not improved for {stopping.evals_since_best} evals; "
            f"the best was step {stopping.best_step} ({stopping.best_loss:.4f}), which becomes the adapter"
        )
        return True
    save_every = run.config.save_every
    if save_every and step % save_every == 0 and step < run.plan.total_steps:
        run.save(step)
    return False


def _forget_previous_accelerator() -> None:
    """accelerate keeps one global state per process; a second run in the same process (tests,
    a notebook, the UI) may want another precision. The process group itself is kept."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset()
