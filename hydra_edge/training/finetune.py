"""`hydra-edge finetune`: data -> clusters -> base + HydraLoRA -> training -> gates -> eval.

Everything the user can get wrong (files, flags, the --out folder) is checked before the
model is loaded, so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_edge.adapter.inject import WEIGHTS_FILE
from hydra_edge.clusters.fit import fit_clusters, load_clusters, save_clusters, summary_lines
from hydra_edge.data.chat_templates import resolve_chat_template
from hydra_edge.data.records import load_records, pack_samples, read_records, tokenize_records
from hydra_edge.errors import UserError
from hydra_edge.files import atomic_write_text, ensure_writable_dir, read_json_object
from hydra_edge.models.base import resolve_model_reference
from hydra_edge.models.tiny import TINY_NAME
from hydra_edge.training.adapted_base import AdaptedBase, build_adapted_base
from hydra_edge.training.checkpoint import checkpoint_problem, list_checkpoints, remove_stale_temp
from hydra_edge.training.config import FinetuneConfig, check_settings, run_data_files
from hydra_edge.training.run_outputs import gates_and_score, save_trained_adapter
from hydra_edge.training.tracking import check_trackers, hyperparameters, make_trackers

RUN_CONFIG = "run_config.json"
# Settings a resumed run may change; everything else must match the saved run.
RESUMABLE_OVERRIDES = ("max_steps", "epochs", "save_every", "max_bad_steps", "report_to", "run_name")


def log(message: str) -> None:
    """Progress notes on stderr, from the main process only (RANK is set by torchrun/accelerate)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def resolve_resume(config: FinetuneConfig, explicit: set[str]) -> tuple[FinetuneConfig, Path | None]:
    """For --resume: the saved run's config (plus allowed overrides) and its latest checkpoint."""
    out = Path(config.out)
    if not config.resume:
        if list_checkpoints(out) or (out / WEIGHTS_FILE).exists():
            raise UserError(
                f"--out {out}: already holds a trained run; add --resume to continue it, or pick another --out"
            )
        return config, None  # an empty folder, or a run that died before its first checkpoint
    if not (out / RUN_CONFIG).is_file():
        raise UserError(f"--resume: {out} holds no run to resume ({RUN_CONFIG} missing); check --out")
    run_config = out / RUN_CONFIG
    saved = read_run_config(out)
    for key in RESUMABLE_OVERRIDES:
        if key in explicit:
            saved[key] = getattr(config, key)
    saved["resume"] = True
    saved["out"] = str(out)  # the folder may have moved since the run started
    try:
        resumed = FinetuneConfig(**saved)
    except ValueError as exc:
        raise UserError(f"{run_config}: {exc}; the run's settings are damaged, start a new run") from exc
    return resumed, _intact_checkpoint(out)


def read_run_config(out: Path) -> dict:
    """A run folder's saved settings, each key and type checked (values are checked when a
    FinetuneConfig is built from them); one line naming the file otherwise."""
    run_config = Path(out) / RUN_CONFIG
    return check_settings(
        read_json_object(run_config, "the run's settings are damaged; start a new run"), str(run_config)
    )


def _intact_checkpoint(out: Path) -> Path:
    """The newest checkpoint that is not damaged, saying which newer ones were passed over."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise UserError(f"--resume: {out} has no complete checkpoint yet; start the run again without --resume")
    for newer, checkpoint in enumerate(reversed(checkpoints)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        following = checkpoints[-2 - newer] if newer + 1 < len(checkpoints) else None
        log(
            f"--resume: checkpoint {checkpoint} is damaged ({problem}); "
            + (f"falling back to {following.name}" if following else "no earlier checkpoint is left")
        )
    raise UserError(
        f"--resume: every checkpoint in {out / 'checkpoints'} is damaged; start the run again without --resume"
    )


@dataclass
class _RunData:
    """The run's rows, read and checked before any model loads, with the chat template and the
    clusters their prompts fall into (one head per cluster)."""

    records: list
    eval_records: list
    eval_file: str | None
    template: str | None
    clusters: Any  # clusters.fit's clusters: one head each
    labels: Any  # each training row's cluster


def run_finetune(config: FinetuneConfig, explicit: set[str] = frozenset(), on_step=None) -> dict:
    """The whole run, phase by phase: --out checked, data and clusters, base model and adapter,
    the training, then the adapter written, its gates measured and the held-out rows scored."""
    import torch
    from accelerate import PartialState

    from hydra_edge.training.held_out import restore_best

    process = PartialState(cpu=not torch.cuda.is_available())  # one per `accelerate launch` process
    config, resume_from = _prepare_out(config, explicit, process)
    out = Path(config.out)
    started = time.perf_counter()
    data = _data_and_clusters(config, out, resume_from, process)
    adapted = _base_and_adapter(config, data)
    samples, train_samples = _tokenize(config, adapted.base.tokenizer, data)
    summary = _training(config, adapted, data, train_samples, resume_from, process, on_step)

    if not summary.pop("is_main_process"):
        return {"train": summary, "adapter": str(out), "secondary_process": True}  # the main one writes
    if config.early_stopping and summary["best_step"] is not None:
        restore_best(out, adapted.base.model)
        log(f"adapter: the weights of step {summary['best_step']}, the best held-out loss (--early-stopping)")
    save_trained_adapter(config, adapted, summary, out)
    try:
        result = gates_and_score(config, adapted.base, samples, data.clusters, data.eval_records, summary, out)
    except Exception:  # the adapter is safe on disk: say so, and how to score it, above the cause
        rescore = (
            f"; score it with: hydra-edge eval --adapter {out} --data {data.eval_file}" if data.eval_records else ""
        )
        log(f"finetune: the trained adapter is saved in {out}{rescore}")
        raise
    result["total_time_s"] = time.perf_counter() - started
    return result


def _prepare_out(config: FinetuneConfig, explicit: set[str], process) -> tuple[FinetuneConfig, Path | None]:
    """The run's settings (the saved run's on --resume) and the checkpoint to resume from, with
    --out checked writable and cleared of unfinished saves before any process writes to it."""
    config, resume_from = resolve_resume(config, explicit)
    out = Path(config.out)
    if process.is_main_process:
        ensure_writable_dir(out, "--out")
        stale = remove_stale_temp(out)
        if stale:
            log(f"checkpoints: removed {len(stale)} unfinished save(s) left by a stopped run ({', '.join(stale)})")
    process.wait_for_everyone()  # every process checked --out before the main one writes to it
    return config, resume_from


def _data_and_clusters(config: FinetuneConfig, out: Path, resume_from: Path | None, process) -> _RunData:
    """The model reference and the data, validated before any model is loaded; then the clusters
    (fitted, or the saved run's on --resume), whose number is the number of heads."""
    if config.model != TINY_NAME:
        resolve_model_reference(config.model)
    data_files, eval_file = run_data_files(config.model, config.data, config.eval_data)
    if not data_files:
        raise UserError(
            "--data: no training file given; pass --data FILE.jsonl "
            "(the demo data is for the presets: --model tiny or gemma3-270m)"
        )
    check_trackers(config.report_to)
    template = resolve_chat_template(config.chat_template) if config.chat_template else None
    loaded = load_records(data_files, config.format, config.skip_invalid)
    records = loaded.records
    eval_records = read_records(eval_file) if eval_file else []
    if config.eval_every and not eval_records:
        raise UserError("--eval-every: no held-out rows to score; pass --eval-data FILE.jsonl")
    formats = ", ".join(f"{Path(f).name} ({fmt})" for f, fmt in loaded.formats.items())
    log(
        f"data: {len(records)} training rows from {formats}"
        + (f"; {len(eval_records)} held-out rows" if eval_records else "")
    )
    if loaded.skipped:
        counts = ", ".join(f"{reason}: {n}" for reason, n in loaded.skipped.most_common())
        log(f"data: skipped {sum(loaded.skipped.values())} invalid rows ({counts})")

    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        clusters = load_clusters(out)
        labels = clusters.assign([r.prompt_text for r in records])
    else:
        # Deterministic, so every process gets the same clusters; the main one saves them.
        clusters, labels = fit_clusters([r.prompt_text for r in records], config.fixed_heads, config.max_k)
        if process.is_main_process:
            save_clusters(clusters, out, labels)
            atomic_write_text(out / RUN_CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
    for line in summary_lines(clusters):
        log(line)
    return _RunData(records, eval_records, eval_file, template, clusters, labels)


def _base_and_adapter(config: FinetuneConfig, data: _RunData) -> AdaptedBase:
    """The base model in the run's precision, with HydraLoRA (one head per cluster) in it."""
    from hydra_edge.models.base import cpu_class, resolve_mixed_precision

    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    if config.mixed_precision == "auto" and mixed_precision == "no":
        log(
            f"precision: float32 (this CPU, {cpu_class()}, has no native bf16, which would run ~100x slower; "
            "--mixed-precision bf16 forces it)"
        )
    adapted = build_adapted_base(config, data.clusters.k, data.template, mixed_precision)
    log(
        f"model: {adapted.base.reference} ({config.quant}), {len(adapted.modules)} modules adapted, "
        f"heads={adapted.heads}, rank={config.rank}, trainable params={adapted.trainable:,}"
    )
    return adapted


def _tokenize(config: FinetuneConfig, tokenizer, data: _RunData) -> tuple[list, list]:
    """(samples, training rows): the rows rendered into token ids with their clusters, and what
    the loop trains on (the samples packed into --seq-len rows with --packing)."""
    tokenized = tokenize_records(
        tokenizer, data.records, config.seq_len, data.labels.tolist(), config.overlong, config.skip_invalid
    )
    samples = tokenized.samples
    if tokenized.unrenderable:
        log(f"data: skipped {tokenized.unrenderable} rows the chat template cannot render (--skip-invalid)")
    if tokenized.truncated:
        log(f"data: {tokenized.truncated} samples longer than --seq-len {config.seq_len} truncated")
    if tokenized.dropped_overlong:
        log(
            f"data: {tokenized.dropped_overlong} samples longer than --seq-len {config.seq_len} dropped "
            "(--overlong drop)"
        )
    if tokenized.dropped_no_target:
        log(f"data: {tokenized.dropped_no_target} samples dropped (no answer token within --seq-len)")
    train_samples = pack_samples(samples, config.seq_len) if config.packing else samples
    if config.packing:
        log(f"data: packed {len(samples)} samples into {len(train_samples)} rows of <= {config.seq_len} tokens")
    return samples, train_samples


def _training(
    config: FinetuneConfig,
    adapted: AdaptedBase,
    data: _RunData,
    train_samples: list,
    resume_from: Path | None,
    process,
    on_step,
) -> dict:
    """Trains the adapter (training/loop.py) for the steps the data and the settings make; returns
    the loop's summary."""
    from hydra_edge.training.held_out import BEST_DIR, HeldOut
    from hydra_edge.training.loop import train_loop
    from hydra_edge.training.step_plan import plan_steps

    out, base, heads = Path(config.out), adapted.base, data.clusters.k
    plan = plan_steps(config, len(train_samples), process.num_processes)
    # One head has nothing to route: no router losses, no pooled steps.
    loop_config = config
    if heads == 1:
        loop_config = dataclasses.replace(config, router_loss=0.0, pooled_steps=0.0, router_balance=0.0)
    held_out = None
    if config.eval_every:
        held_out = HeldOut(
            data.eval_records, base.tokenizer, data.clusters, config.seq_len, config.max_new_tokens,
            config.eval_em_rows, config.eval_every,
        )  # fmt: skip
    if resume_from is None and process.is_main_process:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)  # a run that died before its first checkpoint
    run_name = config.run_name or out.resolve().name
    hparams = {**config.to_dict(), "num_heads": heads, "trainable_params": adapted.trainable}
    return train_loop(
        base.model,
        train_samples,
        loop_config,
        plan,
        out,
        base.tokenizer.pad_token_id,
        adapted.mixed_precision,
        resume_from=resume_from,
        on_step=on_step,
        held_out=held_out,
        trackers=make_trackers(config.report_to, run_name, out),
        hparams=hyperparameters(hparams),
    )
