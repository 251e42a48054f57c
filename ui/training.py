"""Training from the UI: the Train tab's settings -> a `hydra-edge finetune` argument list, and
the run's state read back from what the CLI writes. No gradio here, so it is testable alone.

Paths in the argument list are workspace-relative and the process runs in the workspace, so the
command the tab shows is exactly the one that runs (and a user can paste it into a shell).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra_edge.config import PRESET_DEFAULTS, TINY_PRESET_DEFAULTS, FinetuneConfig, build_config
from hydra_edge.errors import UserError
from hydra_edge.files import atomic_write_text
from hydra_edge.ui.jobs import STOPPED_CODES, Job, JobManager
from hydra_edge.ui.workspace import RUNS_DIR, Workspace

TRAIN_LOG = "train.log"
MAX_PLOT_POINTS = 2000
_CONFIG_DEFAULTS = FinetuneConfig()


@dataclass
class TrainSettings:
    """What the Train tab's form holds (defaults: the tiny preset on the demo data)."""

    model: str = "tiny"
    data: str = "data/demo/train.jsonl"
    eval_data: str = "data/demo/eval.jsonl"  # "" = none
    format: str = "auto"
    skip_invalid: bool = False
    heads: str = "auto"
    rank: int = _CONFIG_DEFAULTS.rank
    alpha: float = _CONFIG_DEFAULTS.alpha
    targets: str = _CONFIG_DEFAULTS.targets
    quant: str = _CONFIG_DEFAULTS.quant
    seq_len: int = TINY_PRESET_DEFAULTS["seq_len"]
    batch_size: int = TINY_PRESET_DEFAULTS["batch_size"]
    grad_accum: int = TINY_PRESET_DEFAULTS["grad_accum"]
    lr: float = TINY_PRESET_DEFAULTS["lr"]
    length: str = "steps"  # train for max_steps optimizer steps, or for epochs passes
    max_steps: int = TINY_PRESET_DEFAULTS["max_steps"]
    epochs: float = _CONFIG_DEFAULTS.epochs
    dropout: float = _CONFIG_DEFAULTS.dropout
    warmup: float = TINY_PRESET_DEFAULTS["warmup"]
    head_init: str = _CONFIG_DEFAULTS.head_init
    packing: bool = False
    seed: int = _CONFIG_DEFAULTS.seed
    save_every: int = TINY_PRESET_DEFAULTS["save_every"]
    run_name: str = ""  # "" = run-<date>-<time>


def defaults_for(model: str) -> dict:
    """The length/speed settings worth starting from for this base: the tiny preset's demo values,
    or finetune's general defaults for a real model."""
    preset = PRESET_DEFAULTS.get((model or "").strip())
    if preset:
        return {k: preset[k] for k in ("seq_len", "batch_size", "grad_accum", "lr", "warmup", "save_every")} | {
            "length": "steps",
            "max_steps": preset["max_steps"],
        }
    return {
        "seq_len": _CONFIG_DEFAULTS.seq_len,
        "batch_size": _CONFIG_DEFAULTS.batch_size,
        "grad_accum": _CONFIG_DEFAULTS.grad_accum,
        "lr": _CONFIG_DEFAULTS.lr,
        "warmup": _CONFIG_DEFAULTS.warmup,
        "save_every": _CONFIG_DEFAULTS.save_every,
        "length": "epochs",
        "max_steps": 1000,
    }


def model_choices(ws: Workspace) -> list[str]:
    """The base models the form offers: the presets this install can load, then the workspace's."""
    from hydra_edge.gguf_models import GEMMA_NAME, gemma_installed

    return ["tiny", *([GEMMA_NAME] if gemma_installed() else []), *ws.model_folders()]


def resolve_model(ws: Workspace, text: str) -> str:
    """A preset (tiny, gemma3-270m), a folder or .gguf file in the workspace (workspace-relative),
    or a Hugging Face id."""
    from hydra_edge.models import HUB_ID

    text = (text or "").strip()
    if not text:
        raise UserError("base model: empty; choose tiny, a Hugging Face id or a folder under models/")
    if text in PRESET_DEFAULTS:
        return text
    looks_like_path = text.startswith(("/", ".", "~", "\\")) or "\\" in text or text.count("/") > 1
    candidate = ws.resolve(text, "base model", must_exist=False)  # refuses '..' and outside paths
    if looks_like_path or candidate.exists():
        if candidate.is_file() and candidate.suffix.lower() == ".gguf":
            return ws.rel(ws.resolve(text, "base model", kind="file"))
        folder = ws.resolve(text, "base model", kind="dir")
        if not (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):
            raise UserError(
                f"base model {text}: the folder has no config.json; give a Hugging Face model folder or a .gguf file"
            )
        return ws.rel(folder)
    if not HUB_ID.match(text):
        raise UserError(f"base model {text}: use tiny, a Hugging Face id (org/name) or a folder under models/")
    return text


def _whole(name: str, value) -> int:
    number = _number(name, value)
    if number != int(number):
        raise UserError(f"{name}: {value} must be a whole number")
    return int(number)


def _number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{name}: {value} is not a finite number")
    return number


def run_name_or_default(name: str) -> str:
    return (name or "").strip() or time.strftime("run-%Y%m%d-%H%M%S")


CONFIG_YAML = "config.yaml"


def build_command(
    ws: Workspace, s: TrainSettings, run_name: str | None = None, config_class: type[FinetuneConfig] = FinetuneConfig
) -> tuple[list[str], Path, FinetuneConfig]:
    """(finetune argument list, run folder, settings) for the form's values, every value checked
    (paths against the workspace, numbers by finetune's own config rules). The run is
    `finetune --config runs/<name>/config.yaml`: the form builds a FinetuneConfig, and the YAML
    (written by start_training) holds every setting, so nothing is re-listed here."""
    name = run_name or run_name_or_default(s.run_name)
    out = ws.new_folder(RUNS_DIR, name, "run name")
    model = resolve_model(ws, s.model)
    data = ws.rel(ws.data_source(s.data, "training data"))
    eval_data = ws.rel(ws.data_source(s.eval_data, "held-out data")) if (s.eval_data or "").strip() else None
    settings = {
        "model": model,
        "data": [data],
        "format": s.format,
        "skip_invalid": bool(s.skip_invalid),
        "eval_data": eval_data,
        "heads": str(s.heads).strip(),
        "rank": _whole("rank", s.rank),
        "alpha": _number("alpha", s.alpha),
        "targets": (s.targets or "").strip(),
        "quant": s.quant,
        "seq_len": _whole("seq-len", s.seq_len),
        "batch_size": _whole("batch size", s.batch_size),
        "grad_accum": _whole("grad-accum", s.grad_accum),
        "lr": _number("learning rate", s.lr),
        "dropout": _number("dropout", s.dropout),
        "warmup": _number("warmup", s.warmup),
        "head_init": s.head_init,
        "packing": bool(s.packing),
        "seed": _whole("seed", s.seed),
        "save_every": _whole("save every", s.save_every),
        "out": ws.rel(out),
    }
    if s.length == "epochs":
        settings["epochs"] = _number("epochs", s.epochs)
    elif s.length == "steps":
        settings["max_steps"] = _whole("max steps", s.max_steps)
    else:
        raise UserError(f"training length {s.length!r}: choose steps or epochs")
    config = build_config({}, settings, config_class)  # finetune's own checks and preset values
    return ["finetune", "--config", ws.rel(out / CONFIG_YAML)], out, config


def config_yaml(config: FinetuneConfig) -> str:
    """The run's settings as `finetune --config` reads them: every field, in declaration order."""
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


def run_preview(ws: Workspace, argv: list[str], out: Path, config: FinetuneConfig) -> str:
    """The command a run executes and the settings file it reads (written when it starts), as
    the Train tab shows them."""
    settings = "".join(f"#   {line}\n" for line in config_yaml(config).splitlines())
    return f"{command_text(ws, argv)}\n# {ws.rel(out / CONFIG_YAML)} (written when the run starts):\n{settings}"


def command_text(ws: Workspace, argv: list[str]) -> str:
    """The shell command a user can paste to run the same thing."""
    return f"cd {shlex.quote(str(ws.root))}\nhydra-edge {shlex.join(argv)}"


def start_training(ws: Workspace, jobs: JobManager, s: TrainSettings) -> Job:
    """Checks the data, then starts one finetune process (refused while any job runs)."""
    from hydra_edge.ui.datasets import validate_data

    name = run_name_or_default(s.run_name)
    argv, out, config = build_command(ws, s, name)
    report = validate_data(ws, s.data, s.format)
    if report["invalid"] and not s.skip_invalid:
        raise UserError(
            f"{report['file']}: {report['invalid']} invalid rows (of {report['invalid'] + report['rows']}); "
            "fix them, or tick 'Skip invalid rows' to train on the valid ones"
        )

    def run_folder_is_free() -> None:
        from hydra_edge.checkpoint import list_checkpoints

        if (
            list_checkpoints(out)
            or (out / "adapter_config.json").exists()
            or (out / "adapter_model.safetensors").exists()
        ):
            raise UserError(f"run name {name}: already used by a run in {ws.rel(out)}; pick another name, or Resume it")
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a failed start's leftovers
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_YAML, config_yaml(config))

    return jobs.start("train", name, out, argv, out / TRAIN_LOG, check=run_folder_is_free)


def resume_training(ws: Workspace, jobs: JobManager, run: str, max_steps: float | None = None) -> Job:
    """`finetune --out RUN --resume [--max-steps N]`: continues a stopped run from its latest
    checkpoint, to its planned length or to a new total of N steps."""
    from hydra_edge.checkpoint import list_checkpoints

    run = (run or "").strip()
    if not run:
        raise UserError("resume: choose a stopped run")
    out = ws.resolve(run if "/" in run else f"{RUNS_DIR}/{run}", "run", kind="dir")
    if not (out / "run_config.json").is_file():
        raise UserError(f"resume {ws.rel(out)}: not a training run (run_config.json missing)")
    if (out / "adapter_config.json").is_file():
        raise UserError(f"resume {ws.rel(out)}: this run already finished; its adapter is ready")
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise UserError(f"resume {ws.rel(out)}: no checkpoint was saved yet; start the run again")
    step = int(checkpoints[-1].name.split("-")[1])
    argv = ["finetune", "--out", ws.rel(out), "--resume"]
    if max_steps not in (None, "", 0):
        total = _whole("steps in total", max_steps)
        if total <= step:
            raise UserError(
                f"resume {ws.rel(out)}: {total} steps in total, but the checkpoint is at step {step}; "
                "give more, or 0 to finish as planned"
            )
        argv += ["--max-steps", str(total)]
    job = jobs.start("train", out.name, out, argv, out / TRAIN_LOG, resumed_from_step=step)
    return job


def stop_training(jobs: JobManager, timeout: float = 60.0) -> Job:
    return jobs.stop("train", timeout)


def metric_rows(jobs: JobManager) -> list[dict]:
    """Every metrics row of the current (or last) run, for the plots."""
    job = jobs.last.get("train")
    return list(job.metrics.read()) if job is not None and job.metrics is not None else []


def plot_rows(rows: list[dict]) -> list[dict]:
    """At most MAX_PLOT_POINTS rows, evenly spaced, always keeping the last one."""
    if len(rows) <= MAX_PLOT_POINTS:
        return rows
    every = -(-len(rows) // MAX_PLOT_POINTS)
    return rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])


def _eta(rows: list[dict], new_rows: int) -> float | None:
    if not rows or new_rows == 0:
        return None
    recent = rows[-min(20, new_rows) :]
    per_step = sum(r["step_time_s"] for r in recent) / len(recent)
    return per_step * max(0, rows[-1]["total_steps"] - rows[-1]["step"])


def _checkpoint(ws: Workspace, out: Path) -> str | None:
    from hydra_edge.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(out)
    return ws.rel(checkpoints[-1]) if checkpoints else None


def training_status(ws: Workspace, jobs: JobManager) -> dict:
    """The state of the current (or last) training run, as the tab shows it and the API returns it."""
    job = jobs.last.get("train")
    if job is None:
        return {
            "state": "idle",
            "phase": None,
            "run": None,
            "message": "No training in this session yet. Choose the data and settings, then Start.",
            "step": 0,
            "total_steps": None,
            "points": 0,
        }
    rows = job.metrics.read()
    new_rows = sum(1 for r in rows if r["step"] > job.resumed_from_step)
    last = rows[-1] if rows else None
    code = job.process.poll()
    status = {
        "run": job.name,
        "out": ws.rel(job.out),
        "pid": job.process.pid,
        "returncode": code,
        "command": job.command,
        "points": len(rows),
        "processes_started": jobs.spawned,
        "step": last["step"] if last else job.resumed_from_step,
        "total_steps": last["total_steps"] if last else None,
        "loss": last["loss"] if last else None,
        "lr": last["lr"] if last else None,
        "tokens_per_s": last["tokens_per_s"] if last else None,
        "elapsed_s": time.time() - job.started_at,
        "eta_s": _eta(rows, new_rows) if code is None else None,
        "checkpoint": None,
        "adapter": None,
        "eval": None,
    }
    if code is None:
        if job.stop_requested:
            status["state"], status["phase"] = "stopping", "stopping"
            status["message"] = f"Stopping {job.name}: finishing step {status['step'] + 1} and saving a checkpoint…"
        elif new_rows == 0:
            status["state"], status["phase"] = "running", "preparing"
            status["message"] = f"Preparing {job.name}: " + _last_note(job)
        elif last["step"] >= last["total_steps"]:
            status["state"], status["phase"] = "running", "finishing"
            status["message"] = f"{job.name}: training done; saving the adapter and scoring the held-out data…"
        else:
            status["state"], status["phase"] = "running", "training"
            status["message"] = f"Training {job.name}: " + _progress_line(status)
        return status
    status["phase"] = None
    status["checkpoint"] = _checkpoint(ws, job.out)
    if code == 0:
        status["state"] = "finished"
        status["adapter"] = ws.rel(job.out)
        status["eval"] = _read_json(job.out / "eval_results.json")
        score = ""
        if status["eval"] and status["eval"].get("exact_match") is not None:
            score = f"; held-out exact-match {100 * status['eval']['exact_match']:.1f}% on {status['eval']['n']} rows"
        loss = f", final loss {status['loss']:.4f}" if status["loss"] is not None else ""
        status["message"] = f"{job.name} finished: {status['step']} steps{loss}{score}. Adapter: {ws.rel(job.out)}"
    elif code in STOPPED_CODES or job.stop_requested:
        status["state"] = "stopped"
        if status["checkpoint"]:
            status["message"] = (
                f"{job.name} stopped at step {status['step']}; checkpoint saved "
                f"({status['checkpoint']}). Resume continues it."
            )
        else:
            status["message"] = f"{job.name} stopped before its first step; nothing to resume, start it again."
    else:
        status["state"] = "failed"
        status["message"] = f"{job.name} failed: {job.error_message()}"
    return status


def _progress_line(status: dict) -> str:
    parts = [
        f"step {status['step']}/{status['total_steps']}",
        f"loss {status['loss']:.4f}",
        f"lr {status['lr']:.2e}",
        f"{status['tokens_per_s']:,.0f} tokens/s",
    ]
    if status["eta_s"] is not None:
        parts.append(f"ETA {format_seconds(status['eta_s'])}")
    return " · ".join(parts)


def _last_note(job: Job) -> str:
    """The CLI's latest progress note (data, clusters, model), or a generic one."""
    lines = job.log_tail(4096).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("$ hydra-edge ")]
    for line in reversed(lines[starts[-1] + 1 if starts else 0 :]):  # this process's notes only
        line = line.strip()
        if line and not line.startswith("cluster ") and "warn" not in line.lower():
            return line[:200]
    return "reading the data, clustering it and loading the base model…"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def settings_from_kwargs(values: dict) -> TrainSettings:
    """TrainSettings from the form's values (unknown keys refused, missing ones defaulted)."""
    known = set(asdict(TrainSettings()))
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown training settings: {', '.join(sorted(unknown))}")
    return TrainSettings(**{k: v for k, v in values.items() if v is not None})
