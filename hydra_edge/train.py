"""The training loop, readable top to bottom (torchtune-style), on `accelerate`.

One optimizer step = `grad_accum` micro-batches. The data order is a pure function of
(seed, epoch), so the data position is just the step number and a resumed run sees exactly
the batches an uninterrupted one would. A step whose loss or gradient norm is not finite is
skipped (parameters unchanged); `max_bad_steps` of them in a row abort the run.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from hydra_edge.checkpoint import load_checkpoint, save_checkpoint
from hydra_edge.data import IGNORE_INDEX, Sample, collate
from hydra_edge.errors import TrainingDiverged, TrainingStopped
from hydra_edge.files import atomic_write_text
from hydra_edge.held_out import (
    COLLAPSED_HEAD_COSINE,
    EarlyStopping,
    HeldOut,
    heads_collapsed,
    save_best,
    tracker_values,
)
from hydra_edge.lm_head import mean_label_loss
from hydra_edge.optimizers import build_optimizer, build_scheduler
from hydra_edge.quant import check_4bit_backprop, prepare_4bit_for_training
from hydra_edge.switches import pooled_gates, router_balance, router_targets
from hydra_edge.tracking import PROJECT

METRICS_FILE = "metrics.jsonl"
# Training-row fields the trackers get (as train/<name>).
TRACKED = (
    "loss",
    "router_loss",
    "router_balance",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "epoch",
    "peak_gpu_mem_gb",
)


@dataclass
class LoopSettings:
    total_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float
    seed: int
    save_every: int
    max_bad_steps: int
    router_loss: float = 0.0
    router_balance: float = 0.0
    router_loss_schedule: str = "constant"
    pooled_steps: float = 0.0
    pool_over: str = "cluster"
    lr_scheduler: str = "cosine"
    min_lr_rate: float = 0.1
    optim: str = "adamw"
    early_stopping: int | None = None  # patience, in held-out evals


def steps_for(num_samples: int, batch_size: int, grad_accum: int, epochs: float, num_processes: int = 1) -> int:
    """Optimizer steps that make `epochs` passes over the data."""
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
    (hydra_edge/switches.py)."""
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
    appended (layers.HydraLoRALinear._balance_router), in [-1, 1]; zero when off.
    """
    router_losses, balance_losses = collected
    loss = mean_label_loss(model, batch)
    zero = torch.zeros((), device=loss.device)
    router_loss = zero
    if router_losses:
        nll = sum(n for n, _ in router_losses)
        router_loss = nll / max(1, sum(c for _, c in router_losses))
    balance = torch.stack(balance_losses).mean() if balance_losses else zero
    return loss, router_loss, balance


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
    settings: LoopSettings,
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
        return _train(accelerator, model, samples, settings, out_dir, pad_id, resume_from, run_state, on_step, held_out)
    finally:
        # With mixed precision, accelerate.prepare wraps the model's forward in autocast and
        # casts its outputs to float32. Left on, every later use (gate pass, eval, export)
        # would run a different computation than a freshly loaded adapter: unwrap it.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if trackers:
            accelerator.end_training()


def _train(accelerator, model, samples, settings, out_dir, pad_id, resume_from, run_state, on_step, held_out) -> dict:
    prepare_4bit_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, settings.optim, settings.lr, settings.weight_decay)
    scheduler = build_scheduler(
        optimizer, settings.lr_scheduler, settings.warmup_steps, settings.total_steps, settings.min_lr_rate
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step, bad_in_a_row, skipped_total = 0, 0, 0
    stopping = EarlyStopping(settings.early_stopping)
    metrics_path = out_dir / METRICS_FILE
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        start_step, bad_in_a_row, skipped_total = state["step"], state["bad_in_a_row"], state["skipped_total"]
        stopping = EarlyStopping.restore(settings.early_stopping, state.get("early_stopping"))
        if accelerator.is_main_process:
            _truncate_metrics(metrics_path, start_step)
    elif metrics_path.exists() and accelerator.is_main_process:
        metrics_path.unlink()
    accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = epoch_batches(samples, 0, settings.seed, settings.batch_size, rank, world)
    micro_per_epoch = len(per_epoch)
    cached_epoch = {0: per_epoch}
    device = accelerator.device
    run_start = time.perf_counter()
    bar = _progress(settings.total_steps, start_step, accelerator.is_main_process)

    def save(step: int) -> Path:
        """Every process reaches this; only the main one writes (DDP replicas are identical)."""
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return out_dir / "checkpoints" / f"step-{step:06d}"
        trainer_state = {
            "bad_in_a_row": bad_in_a_row,
            "skipped_total": skipped_total,
            "early_stopping": stopping.state(),
            **(run_state or {}),
        }
        return save_checkpoint(out_dir, step, accelerator.unwrap_model(model), optimizer, scheduler, trainer_state)

    step = start_step
    last_loss = float("nan")
    with _StopFlag() as stop, open(metrics_path, "a", encoding="utf-8") as metrics:
        while step < settings.total_steps:
            model.train()
            # After any inference forward (an eval pass, the LM-head probe): hydra_edge/quant.py.
            check_4bit_backprop(accelerator.unwrap_model(model), f"before step {step + 1}")
            step_start = time.perf_counter()
            micro_batches = []
            for micro in range(settings.grad_accum):
                epoch, within = divmod(step * settings.grad_accum + micro, micro_per_epoch)
                if epoch not in cached_epoch:
                    cached_epoch.clear()
                    cached_epoch[epoch] = epoch_batches(samples, epoch, settings.seed, settings.batch_size, rank, world)
                micro_batches.append(cached_epoch[epoch][within])
            # Each micro-batch's mean loss is weighted by its share of the step's target tokens,
            # so the step's loss is the mean over all its tokens, however they fall into batches.
            tokens = sum(len(s.input_ids) for group in micro_batches for s in group)
            micro_batches = [collate(group, pad_id, with_clusters=True) for group in micro_batches]
            targets = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
            total_targets = max(1, sum(targets))
            step_loss = torch.zeros((), device=device)
            step_router_loss = torch.zeros((), device=device)
            step_balance = torch.zeros((), device=device)
            factor = router_weight_factor(step, settings.total_steps, settings.router_loss_schedule)
            router_weight, balance_weight = settings.router_loss * factor, settings.router_balance * factor
            for micro, (batch, n_targets) in enumerate(zip(micro_batches, targets)):
                batch = {k: v.to(device) for k, v in batch.items()}
                sync = micro == settings.grad_accum - 1
                share = n_targets / total_targets
                pooled = is_pooled_step(step, settings.pooled_steps)
                with (
                    micro_batch_switches(
                        model, batch, pooled, settings.pool_over, router_weight, balance_weight
                    ) as collected,
                    accelerator.autocast(),
                    accelerator.no_sync(model) if not sync and world > 1 else _null(),
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
            loss_value = float(step_loss)
            router_loss_value = float(step_router_loss)
            if settings.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, settings.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            skipped = not (math.isfinite(loss_value) and math.isfinite(router_loss_value) and math.isfinite(grad_norm))
            lr_now = scheduler.get_last_lr()[0]
            if skipped:
                bad_in_a_row += 1
                skipped_total += 1
            else:
                optimizer.step()
                bad_in_a_row = 0
                last_loss = loss_value
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - step_start
            row = {
                "step": step,
                "total_steps": settings.total_steps,
                "loss": loss_value,
                "router_loss": router_loss_value,
                "router_balance": float(step_balance),
                "lr": lr_now,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "step_time_s": elapsed,
                "elapsed_s": time.perf_counter() - run_start,
                "epoch": (step * settings.grad_accum) / micro_per_epoch,
                "skipped": skipped,
            }
            if device.type == "cuda":
                row["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if accelerator.is_main_process:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            accelerator.log({f"train/{k}": row[k] for k in TRACKED if k in row}, step=step)
            bar.update(row)
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(model), skipped)
            if held_out is not None and held_out.due(step, settings.total_steps):
                unwrapped = accelerator.unwrap_model(model)
                scores = {"step": step, **held_out.score(unwrapped)}
                scores["heads_collapsed"] = heads_collapsed(scores, settings.warmup_steps)
                best = stopping.update(step, scores["eval_loss"])
                if accelerator.is_main_process:
                    metrics.write(json.dumps(scores) + "\n")
                    metrics.flush()
                    if best and settings.early_stopping:
                        save_best(out_dir, unwrapped, step, scores["eval_loss"])
                    bar.note(_eval_line(scores, stopping))
                    if scores["heads_collapsed"]:
                        bar.note(_collapse_warning(scores))
                accelerator.log(tracker_values(scores), step=step)
            if bad_in_a_row >= settings.max_bad_steps:
                bar.close()
                raise TrainingDiverged(
                    f"step {step}: {bad_in_a_row} steps in a row had a non-finite loss or gradient; "
                    "lower --lr or check the data (the last good checkpoint is kept)"
                )
            signum = stop.signum
            if world > 1:  # stop together, or one process would wait in save() while others train
                anyone = accelerator.reduce(torch.tensor(int(signum is not None), device=device), reduction="sum")
                signum = signum or (signal.SIGTERM if int(anyone) else None)
            if signum is not None:
                bar.close()
                raise TrainingStopped(signum, step, save(step))
            if stopping.should_stop:
                bar.note(
                    f"early stopping: held-out loss has not improved for {stopping.evals_since_best} evals; "
                    f"the best was step {stopping.best_step} ({stopping.best_loss:.4f}), which becomes the adapter"
                )
                break
            if settings.save_every and step % settings.save_every == 0 and step < settings.total_steps:
                save(step)
    bar.close()
    final_checkpoint = save(step)
    return {
        "steps": step,
        "final_loss": last_loss,
        "skipped_steps": skipped_total,
        "train_time_s": time.perf_counter() - run_start,
        "checkpoint": str(final_checkpoint),
        "is_main_process": accelerator.is_main_process,
        "stopped_early": stopping.should_stop,
        "best_step": stopping.best_step,
    }


def _eval_line(scores: dict, stopping: EarlyStopping) -> str:
    """The progress bar's line for an eval row: held-out loss, exact-match, the best step, and
    the router's health (routing spread, head cosine) where the row has them."""
    em, loss = scores["eval_exact_match"], scores["eval_loss"]
    best = f", best step {stopping.best_step}" if stopping.best_step is not None else ""
    summary = scores.get("router_summary") or {}
    spread, cosine = summary.get("routing_spread"), summary.get("head_cosine")
    return (
        f"eval: step {scores['step']} held-out loss "
        + (f"{loss:.4f}" if loss is not None else "n/a (no answer tokens)")
        + (f", exact-match {100 * em:.1f} % of {scores['eval_em_rows']}" if em is not None else "")
        + best
        + (f", routing spread {spread:.3f}" if spread is not None else "")
        + (f", head cosine {cosine:.2f}" if cosine is not None else "")
    )


# What the warning suggests: the measured configuration whose heads specialise (docs/heads.md).
SPECIALISING_FLAGS = "--head-init random --head-dropout 0.1 --router-temperature 0.1 --router-loss 0.1"


def _collapse_warning(scores: dict) -> str:
    """One line for an eval row where heads_collapsed holds: what happened and the flags that
    keep the heads apart (layers.py's symmetry breaking)."""
    cosine = scores["router_summary"]["head_cosine"]
    return (
        f"warning: the heads have collapsed (mean head cosine {cosine:.2f} > {COLLAPSED_HEAD_COSINE:g} at step "
        f"{scores['step']}): HydraLoRA is training as one LoRA; "
        f"{SPECIALISING_FLAGS} make them specialise (see docs/heads.md for what that costs)"
    )


class _progress:
    """A tqdm bar on a terminal (step, loss, lr, tokens/s, ETA); plain lines when piped."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.enabled, self.started, self.first = total, enabled, time.perf_counter(), initial
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            return
        step = row["step"]
        if step % self.every == 0 or step == self.total:
            done = step - self.first
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            print(
                f"train: step {step}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"tokens/s {row['tokens_per_s']:.0f} eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def note(self, line: str) -> None:
        """A line of its own (an eval result), above the bar on a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _forget_previous_accelerator() -> None:
    """accelerate keeps one global state per process; a second run in the same process (tests,
    a notebook, the UI) may want another precision. The process group itself is kept."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops metric rows past the checkpoint, so a resumed run's log has each step once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a hard kill
    atomic_write_text(path, "".join(line + "\n" for line in keep))
