"""Training from the UI: the Train tab's settings -> a `hydra-edge finetune` argument list, and
the run's state read back from what the CLI writes. No gradio here, so it is testable alone.

Paths in the argument list are workspace-relative and the process runs in the workspace, so the
command the tab shows is exactly the one that runs (and a user can paste it into a shell).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.files import atomic_write_text
from hydra_edge.training.config import PRESET_DEFAULTS, TINY_PRESET_DEFAULTS, FinetuneConfig, build_config
from hydra_edge.ui.jobs import Job, JobManager
from hydra_edge.ui.workspace import RUNS_DIR, Workspace

TRAIN_LOG = "train.log"
_CONFIG_DEFAULTS = FinetuneConfig()


@dataclass
class TrainSettings:
    """What the Train tab's form holds (defaults: the tiny preset on the demo data)."""

    model: str = _CONFIG_DEFAULTS.model
    data: str = "data/demo/train.jsonl"
    eval_data: str = "data/demo/eval.jsonl"  # "" = none
    format: str = _CONFIG_DEFAULTS.format
    skip_invalid: bool = _CONFIG_DEFAULTS.skip_invalid
    heads: str = _CONFIG_DEFAULTS.heads
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
    head_dropout: float = _CONFIG_DEFAULTS.head_dropout
    router_temperature: float = _CONFIG_DEFAULTS.router_temperature
    router_top_k: int = _CONFIG_DEFAULTS.router_top_k
    router_balance: float = _CONFIG_DEFAULTS.router_balance
    router_loss_schedule: str = _CONFIG_DEFAULTS.router_loss_schedule
    packing: bool = _CONFIG_DEFAULTS.packing
    seed: int = _CONFIG_DEFAULTS.seed
    save_every: int = TINY_PRESET_DEFAULTS["save_every"]
    eval_every: int = 50  # held-out loss on the plot every N steps (0: only at the end)
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
    from hydra_edge.models.gguf import GEMMA_NAME, gemma_installed

    return ["tiny", *([GEMMA_NAME] if gemma_installed() else []), *ws.model_folders()]


def resolve_model(ws: Workspace, text: str) -> str:
    """A preset (tiny, gemma3-270m), a folder or .gguf file in the workspace (workspace-relative),
    or a Hugging Face id."""
    from hydra_edge.models.base import HUB_ID

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


def adapter_base(ws: Workspace, adapter_dir: Path) -> str:
    """The base an adapter in the workspace loads onto, checked like the form's model box (a
    preset, a Hub id, or a folder or .gguf file inside the workspace, made absolute): the
    adapter's config names it, and that file may have been written by anyone."""
    from hydra_edge.adapter.config import AdapterConfig

    base = AdapterConfig.load(adapter_dir).base_model
    try:
        model = resolve_model(ws, base)
    except UserError as exc:
        raise UserError(f"{ws.rel(adapter_dir)}/adapter_config.json: base_model {base!r}: {exc}") from None
    return model if model in PRESET_DEFAULTS or not (ws.root / model).exists() else str(ws.root / model)


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
        "head_dropout": _number("head dropout", s.head_dropout),
        "router_temperature": _number("router temperature", s.router_temperature),
        "router_top_k": _whole("router top-k", s.router_top_k),
        "router_balance": _number("router balance", s.router_balance),
        "router_loss_schedule": s.router_loss_schedule,
        "packing": bool(s.packing),
        "seed": _whole("seed", s.seed),
        "save_every": _whole("save every", s.save_every),
        "eval_every": _whole("eval every", s.eval_every) if eval_data else 0,
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
        from hydra_edge.training.checkpoint import list_checkpoints

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
    from hydra_edge.training.checkpoint import list_checkpoints

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
    check_saved_paths(ws, out)
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


def check_saved_paths(ws: Workspace, out: Path) -> None:
    """Every path a run folder's run_config.json names (data, held-out data, base model, chat
    template file) lies inside the workspace, as the form's would: the file is in the workspace,
    so anyone who can write there could otherwise point a resumed run at files outside it."""
    from hydra_edge.data.chat_templates import TEMPLATES
    from hydra_edge.training.finetune import read_run_config

    saved = read_run_config(out)
    try:
        FinetuneConfig(**saved)  # its own checks too (a run name that is a path, say)
    except ValueError as exc:
        raise UserError(f"resume {ws.rel(out)}: run_config.json: {exc}; start a new run") from None
    where = f"resume {ws.rel(out)}: run_config.json names"
    for data in saved.get("data") or []:
        ws.data_source(data, f"{where} training data")
    if saved.get("eval_data"):
        ws.data_source(saved["eval_data"], f"{where} held-out data")
    if saved.get("model"):
        resolve_model(ws, saved["model"])
    template = saved.get("chat_template")
    if template and template not in TEMPLATES:
        ws.resolve(template, f"{where} chat template", kind="file")


def stop_training(jobs: JobManager, timeout: float = 60.0) -> Job:
    return jobs.stop("train", timeout)


def settings_from_kwargs(values: dict) -> TrainSettings:
    """TrainSettings from the form's values (unknown keys refused, missing ones defaulted)."""
    known = set(asdict(TrainSettings()))
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown training settings: {', '.join(sorted(unknown))}")
    return TrainSettings(**{k: v for k, v in values.items() if v is not None})
