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
from collections import Counter
from pathlib import Path

from hydra_edge import __version__
from hydra_edge.adapter import (
    WEIGHTS_FILE,
    base_fingerprint,
    find_target_modules,
    freeze_uniform_router,
    inject_hydra_lora,
    save_adapter,
)
from hydra_edge.adapter_config import AdapterConfig
from hydra_edge.chat_templates import resolve_chat_template
from hydra_edge.checkpoint import checkpoint_problem, list_checkpoints, remove_stale_temp
from hydra_edge.clustering import fit_clusters, load_clusters, save_clusters, summary_lines
from hydra_edge.config import FinetuneConfig, check_settings, run_data_files
from hydra_edge.data import load_records, pack_samples, read_records, tokenize_records
from hydra_edge.errors import UserError
from hydra_edge.files import atomic_write_text, ensure_writable_dir, read_json_object
from hydra_edge.models import resolve_model_reference
from hydra_edge.progress import PhaseProgress
from hydra_edge.tiny import TINY_NAME
from hydra_edge.tracking import check_trackers, hyperparameters, make_trackers

RUN_CONFIG = "run_config.json"
EVAL_RESULTS = "eval_results.json"
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


def run_finetune(config: FinetuneConfig, explicit: set[str] = frozenset(), on_step=None) -> dict:
    import torch
    from accelerate import PartialState

    from hydra_edge.held_out import BEST_DIR, HeldOut, restore_best
    from hydra_edge.models import cpu_class, load_base, resolve_mixed_precision
    from hydra_edge.train import LoopSettings, steps_for, train_loop

    process = PartialState(cpu=not torch.cuda.is_available())  # one per `accelerate launch` process
    config, resume_from = resolve_resume(config, explicit)
    out = Path(config.out)
    if process.is_main_process:
        ensure_writable_dir(out, "--out")
        stale = remove_stale_temp(out)
        if stale:
            log(f"checkpoints: removed {len(stale)} unfinished save(s) left by a stopped run ({', '.join(stale)})")
    process.wait_for_everyone()  # every process checked --out before the main one writes to it
    started = time.perf_counter()

    # 1. Model reference and data, validated before any model is loaded.
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

    # 2. Clusters -> number of heads.
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        clusters = load_clusters(out)
        labels = clusters.assign([r.prompt_text for r in records])
    else:
        # Deterministic, so every process gets the same clusters; the main one saves them.
        clusters, labels = fit_clusters([r.prompt_text for r in records], config.num_heads, config.max_k)
        if process.is_main_process:
            save_clusters(clusters, out, labels)
            atomic_write_text(out / RUN_CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
    for line in summary_lines(clusters):
        log(line)
    num_heads = clusters.k

    # 3. Base model + HydraLoRA.
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    if config.mixed_precision == "auto" and mixed_precision == "no":
        log(
            f"precision: float32 (this CPU, {cpu_class()}, has no native bf16, which would run ~100x slower; "
            "--mixed-precision bf16 forces it)"
        )
    dtype = "fp32" if mixed_precision == "no" else "bf16"
    base = load_base(
        config.model,
        quant=config.quant,
        gradient_checkpointing=config.gradient_checkpointing,
        dtype=dtype,
        chat_template=template,
    )
    fingerprint = base_fingerprint(base.resolved, base.model)
    modules = find_target_modules(base.model, config.targets)
    torch.manual_seed(config.seed)
    top_k = config.router_top_k if config.router_top_k < num_heads else 0  # k >= N: every head anyway
    inject_hydra_lora(
        base.model,
        modules,
        config.rank,
        config.alpha,
        num_heads,
        config.dropout,
        config.head_init,
        head_dropout=config.head_dropout,
        router_temperature=config.router_temperature,
        router_top_k=top_k,
    )
    if config.router == "uniform":
        freeze_uniform_router(base.model)
    trainable = sum(p.numel() for p in base.model.parameters() if p.requires_grad)
    log(
        f"model: {base.reference} ({config.quant}), {len(modules)} modules adapted, heads={num_heads}, "
        f"r={config.rank}, trainable params={trainable:,}"
    )

    # 4. Tokenize, train.
    tokenized = tokenize_records(
        base.tokenizer, records, config.seq_len, labels.tolist(), config.overlong, config.skip_invalid
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
    total_steps = config.max_steps or steps_for(
        len(train_samples), config.batch_size, config.grad_accum, config.epochs, process.num_processes
    )
    warmup = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    # The loop's settings of the same name come from the config; one head has nothing to route.
    same_name = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoopSettings) if hasattr(config, f.name)}
    settings = LoopSettings(**same_name, total_steps=total_steps, warmup_steps=warmup)
    if num_heads == 1:
        settings.router_loss = settings.pooled_steps = settings.router_balance = 0.0
    held_out = None
    if config.eval_every:
        held_out = HeldOut(
            eval_records, base.tokenizer, clusters, config.seq_len, config.max_new_tokens, config.eval_em_rows,
            config.eval_every,
        )  # fmt: skip
    if resume_from is None and process.is_main_process:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)  # a run that died before its first checkpoint
    run_name = config.run_name or out.resolve().name
    summary = train_loop(
        base.model,
        train_samples,
        settings,
        out,
        base.tokenizer.pad_token_id,
        mixed_precision,
        resume_from=resume_from,
        on_step=on_step,
        held_out=held_out,
        trackers=make_trackers(config.report_to, run_name, out),
        hparams=hyperparameters({**config.to_dict(), "num_heads": num_heads, "trainable_params": trainable}),
    )

    if not summary.pop("is_main_process"):
        return {"train": summary, "adapter": str(out), "secondary_process": True}  # the main one writes
    if config.early_stopping and summary["best_step"] is not None:
        restore_best(out, base.model)
        log(f"adapter: the weights of step {summary['best_step']}, the best held-out loss (--early-stopping)")

    # 5. The adapter, per-cluster gates, held-out score.
    adapter_config = AdapterConfig(
        base_model=base.reference,
        base_model_resolved=base.resolved,
        base_fingerprint=fingerprint,
        quantization=config.quant,
        dtype=dtype,
        r=config.rank,
        alpha=config.alpha,
        heads=num_heads,
        dropout=config.dropout,
        head_init=config.head_init,
        router=config.router,
        head_dropout=config.head_dropout,
        router_temperature=config.router_temperature,
        router_top_k=top_k,
        targets=config.targets,
        target_modules=modules,
        tokenizer=base.resolved,
        chat_template=getattr(base.tokenizer, "chat_template", None),
        hydra_edge_version=__version__,
        training={k: summary[k] for k in ("steps", "final_loss", "skipped_steps", "stopped_early", "best_step")},
    )
    save_adapter(base.model, out, adapter_config)
    try:
        result = _gates_and_score(config, base, samples, clusters, eval_records, summary, out)
    except Exception:  # the adapter is safe on disk: say so, and how to score it, above the cause
        rescore = f"; score it with: hydra-edge eval --adapter {out} --data {eval_file}" if eval_records else ""
        log(f"finetune: the trained adapter is saved in {out}{rescore}")
        raise
    result["total_time_s"] = time.perf_counter() - started
    return result


def _gates_and_score(config, base, samples, clusters, eval_records, summary, out) -> dict:
    """Per-cluster mean gates (what export merges with) and the held-out score of the trained model."""
    from hydra_edge.evaluate import evaluate
    from hydra_edge.gates import mean_gates_per_cluster, save_cluster_gates
    from hydra_edge.torch_engine import TorchEngine

    gate_rows = sum(min(n, config.gate_samples_per_cluster) for n in Counter(s.cluster for s in samples).values())
    gates, token_counts = mean_gates_per_cluster(
        base.model,
        samples,
        clusters.k,
        base.tokenizer.pad_token_id,
        config.gate_samples_per_cluster,
        progress=PhaseProgress("gates", gate_rows),
    )
    save_cluster_gates(out, gates, token_counts)
    result = {"train": summary, "adapter": str(out)}
    if eval_records:
        engine = TorchEngine(base.model, base.tokenizer, clusters)
        scores = evaluate(engine, eval_records, config.seq_len, config.max_new_tokens, report_progress=True)
        if config.early_stopping:
            scores = {**scores, "best_step": summary["best_step"], "stopped_early": summary["stopped_early"]}
        atomic_write_text(out / EVAL_RESULTS, json.dumps(scores, indent=2) + "\n")
        result["eval"] = scores
    return result
