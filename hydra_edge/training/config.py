"""The `finetune` settings: one dataclass that is also the CLI, the YAML file and the UI's form.

Each field's type, default, help and bounds are written once, here: `hydra-edge finetune`'s
options and their help are generated from the fields (cli/options.py), choices are `Literal[...]` types
(Typer lists them; YAML values are checked against them), and a YAML file gives the same keys
(dashes or underscores). Command-line flags override the YAML; a preset (`tiny`,
`gemma3-270m`: YAML files in presets/, in the same format) supplies demo-friendly values for what
neither of them set. Adding a setting is
adding a field (and a widget, if the web UI should show it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hydra_edge.choices import (
    FormatChoice,
    HeadInit,
    LrScheduler,
    MixedPrecision,
    Optim,
    Overlong,
    PoolOver,
    Quant,
    ReportTo,
    Router,
    RouterLossSchedule,
)
from hydra_edge.errors import UserError
from hydra_edge.files import SETTING_INT_RANGE
from hydra_edge.settings import check_heads, check_max_k, field_problems, setting


@dataclass
class FinetuneConfig:
    model: str = setting(
        "tiny", "Base model: 'tiny' (built-in preset), gemma3-270m, a Hugging Face id, a local folder or a .gguf file."
    )
    data: list[str] = setting(
        [], "Training data files (.jsonl/.json; 'messages' or 'text' rows). Default with a preset: the bundled demo."
    )
    format: FormatChoice = setting("auto", "Row format of --data.")
    skip_invalid: bool = setting(
        False, "Train on the valid rows and report the invalid ones by reason, instead of stopping."
    )
    eval_data: str | None = setting(
        None, "Held-out file scored after training. Default with a preset: the demo's held-out split."
    )
    chat_template: str | None = setting(
        None,
        "Chat template: chatml, llama3, gemma, qwen2.5 or a .jinja file (default: the base's own). Stored in "
        "the adapter; eval, chat, export and serve use it.",
    )
    heads: str = setting("auto", "Number of B heads: 'auto' (k-means elbow over the prompts) or N (1 = plain LoRA).")
    max_k: int = setting(8, "Largest k tried by --heads auto.", ge=1)
    rank: int = setting(8, "LoRA rank r of the shared A.", ge=1)
    alpha: float = setting(32.0, "LoRA alpha; the branch is scaled by alpha / rank.", gt=0)
    dropout: float = setting(0.05, "Dropout on the A path.", ge=0, lt=1)
    head_init: HeadInit = setting(
        "zero",
        "Head init: 'zero' (reference: heads zero) or 'random' (R-LoRA: distinct heads summing to zero, router "
        "at zero; both start exactly at the base).",
    )
    head_dropout: float = setting(0.0, "Dropout on A·x with an independent mask per head (R-LoRA).", ge=0, lt=1)
    router_temperature: float = setting(1.0, "The router's softmax temperature (below 1: sharper gates).", gt=0)
    router_top_k: int = setting(
        0, "Route each token to its k largest gates, renormalised (straight-through gradient); 0 = every head.", ge=0
    )
    router_balance: float = setting(
        0.0,
        "Weight of the balance-and-certainty loss: each token's gates decisive, all heads used (HMoRA); 0 = off.",
        ge=0,
    )
    router_loss: float = setting(
        0.0,
        "Weight of the router-supervision loss: cross-entropy pulling every token's gates toward "
        "its data cluster's head. Keeps routing consistent within a cluster, so the per-cluster "
        "exports (adapters/merged) match the per-token model; 0 = unsupervised router.",
        ge=0,
    )
    router_loss_schedule: RouterLossSchedule = setting(
        "constant", "--router-loss and --router-balance weights: constant, or linear (annealed to 0 by the last step)."
    )
    pooled_steps: float = setting(
        0.5,
        "Share of steps trained with each sample's gates pooled to their mean over the sample: the "
        "constant gates a per-cluster export (adapters/merged) applies, so it keeps the per-token "
        "model's quality; 0 = plain HydraLoRA.",
        ge=0,
        le=1,
    )
    router: Router = setting(
        "learned",
        "learned (HydraLoRA's per-token router) or uniform (router fixed at zero: every head weighs "
        "1/N; an ablation for benchmarks/quality.py).",
    )
    pool_over: PoolOver = setting(
        "cluster",
        "What a pooled step averages gates over: cluster (the batch's tokens of each data cluster: "
        "the per-cluster gates an export serves), sample (all of each sample's tokens) or prompt "
        "(each sample's prompt tokens, what the request router sees).",
    )
    targets: str = setting("mlp", "Modules to adapt: mlp, attn, all, or a comma list of module names.")
    quant: Quant = setting(
        "nf4", "Base quantization: nf4 (double quant, computing in --mixed-precision's dtype), fp4, or none."
    )
    gradient_checkpointing: bool = setting(True, "Recompute activations in backward to save memory.")
    mixed_precision: MixedPrecision = setting(
        "auto",
        "auto (bf16 on a GPU or a CPU with native bf16, float32 elsewhere: AVX2-only CPUs run bf16 "
        "~100x slower), bf16 (autocast; 4-bit layers compute in bf16), or 'no' for float32 "
        "(with --quant none: exact fp32).",
    )
    seq_len: int = setting(1024, "Maximum tokens per sample (per packed row with --packing).", ge=1)
    overlong: Overlong = setting("truncate", "Samples longer than --seq-len: truncate or drop.")
    packing: bool = setting(False, "Pack short samples into --seq-len rows; attention never crosses samples.")
    batch_size: int = setting(4, "Samples per micro-batch (per process).", ge=1)
    grad_accum: int = setting(4, "Micro-batches accumulated per optimizer step.", ge=1)
    lr: float = setting(2e-4, "Peak learning rate (after warmup).", gt=0)
    lr_scheduler: LrScheduler = setting(
        "cosine",
        "Schedule after warmup (transformers.get_scheduler): cosine, linear (to 0), constant, or "
        "cosine_with_min_lr (cosine down to --min-lr-rate x --lr).",
    )
    min_lr_rate: float = setting(
        0.1, "With --lr-scheduler cosine_with_min_lr: the final lr as a share of --lr.", ge=0, le=1
    )
    optim: Optim = setting(
        "adamw",
        "adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes: 8-bit optimizer states, a "
        "quarter of the memory; paged spills to CPU RAM under GPU memory pressure).",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0)
    epochs: float = setting(3.0, "Passes over the training data (ignored when --max-steps is set).", gt=0)
    max_steps: int | None = setting(None, "Optimizer steps to run; overrides --epochs.", ge=1)
    warmup: float = setting(0.03, "Warmup: a fraction of the steps if < 1, else a number of steps.", ge=0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 disables).", ge=0)
    seed: int = setting(42, "Seed for initialisation, data order and dropout.", ge=0, le=2**32 - 1)
    out: str = setting("hydra-out", "Output folder for the adapter, clusters, metrics and checkpoints.")
    save_every: int = setting(
        200, "Write a resumable checkpoint every N steps (0: only at the end or on a stop).", ge=0
    )
    resume: bool = setting(False, "Continue the run saved in --out from its latest checkpoint.")
    max_bad_steps: int = setting(5, "Abort after this many consecutive steps with a non-finite loss or gradient.", ge=1)
    gate_samples_per_cluster: int = setting(256, "Training samples per cluster used to measure its mean gates.", ge=1)
    max_new_tokens: int = setting(32, "Tokens generated per row for the held-out exact-match.", ge=1)
    eval_every: int = setting(
        0,
        "Score the held-out rows every N steps while training (loss and per-cluster loss; exact-match "
        "on --eval-em-rows rows; the router's health) and log them as `eval` rows; 0 = only at the end.",
        ge=0,
    )
    eval_em_rows: int = setting(32, "Held-out rows answered for the exact-match of each --eval-every pass.", ge=0)
    early_stopping: int | None = setting(
        None,
        "Stop when held-out loss has not improved for this many --eval-every passes, and keep the best "
        "step's adapter as the run's result.",
        ge=1,
    )
    report_to: ReportTo = setting(
        "none",
        "Also log to an experiment tracker (accelerate's): tensorboard (<out>/runs), mlflow (MLFLOW_TRACKING_URI, "
        "else <out>/mlruns), wandb (WANDB_MODE=offline works offline), or all. metrics.jsonl is always written.",
    )
    run_name: str | None = setting(None, "The run's name in the tracker (default: the --out folder's name).")

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        problems = field_problems(self)
        problems += [p for p in (check_heads(self.heads), check_max_k(self.max_k, self.heads)) if p]
        if self.run_name is not None and not _is_plain_name(self.run_name):
            problems.append(
                f"--run-name {self.run_name}: a name, not a path (trackers write under <out>/runs/<name>); "
                "leave out '/', '\\' and '..'"
            )
        if self.heads != "auto" and self.heads.isdigit() and self.router_top_k > int(self.heads):
            problems.append(f"--router-top-k {self.router_top_k}: at most --heads {self.heads}")
        if self.early_stopping is not None and not self.eval_every:
            problems.append("--early-stopping: needs --eval-every N (held-out loss is what it watches)")
        if problems:
            raise ValueError(problems[0])

    @property
    def fixed_heads(self) -> int | None:
        """None for 'auto'."""
        return None if self.heads == "auto" else int(self.heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_plain_name(name: str) -> bool:
    """A name that stays one folder below the folder it is joined to: no separator, no '..'."""
    return bool(name.strip()) and not any(c in name for c in "/\\\x00") and name.strip() not in (".", "..")


def run_data_files(model: str, data: list[str], eval_data: str | None) -> tuple[list[str], str | None]:
    """(training files, held-out file) of a run: a preset without --data trains on the demo data
    and scores on its held-out rows. Export reads the same rule to validate on those rows."""
    from hydra_edge.models.tiny import DEMO_EVAL, DEMO_TRAIN

    demo = model in PRESET_DEFAULTS and not data
    return (list(data) or ([str(DEMO_TRAIN)] if demo else []), eval_data or (str(DEMO_EVAL) if demo else None))


def config_fields(config_class: type[FinetuneConfig] = FinetuneConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def _check_type(name: str, value, annotation: str, config_class: type[FinetuneConfig]):
    """Checks a YAML value against the field's annotation; returns it (ints accepted as floats)."""
    hint = typing.get_type_hints(config_class)[name]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if is_union else (hint,)
    if value is None and type(None) in allowed:
        return value
    low, high = SETTING_INT_RANGE  # a run_config.json can hold any integer; YAML is refused earlier
    if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
        raise UserError(f"config key '{name}': a number too long (a setting takes whole numbers up to {high:,})")
    for t in allowed:
        origin = typing.get_origin(t) or t
        if origin is Literal and isinstance(value, str):  # the choice itself is checked once, by the config
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if origin is list and isinstance(value, str):
            return [value]
        if origin is str and isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is bool and isinstance(value, bool):
            return value
    raise UserError(f"config key '{name}': expected {annotation}, got {value!r}")


def read_yaml_config(path: str | Path, config_class: type[FinetuneConfig] = FinetuneConfig) -> dict:
    """The YAML file's settings, with unknown keys and wrong types rejected by name (a number too
    long for a setting too, at its line: files.parse_yaml)."""
    import yaml

    from hydra_edge.files import parse_yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8") from exc
    except RecursionError as exc:
        raise UserError(f"{path}: nested too deeply to read; a config is a flat mapping of settings") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return check_settings(raw, str(path), config_class)


def check_settings(raw: dict, source: str, config_class: type[FinetuneConfig] = FinetuneConfig) -> dict:
    """Settings from a file (a YAML config, a run's run_config.json), with unknown keys and wrong
    types refused by name; values are checked when the FinetuneConfig is built."""
    fields = config_fields(config_class)
    settings = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UserError(f"{source}: unknown key '{key}' (known: {', '.join(fields)})")
        try:
            settings[name] = _check_type(name, value, str(fields[name].type), config_class)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
    return settings


def build_config(
    yaml_settings: dict, cli_settings: dict, config_class: type[FinetuneConfig] = FinetuneConfig
) -> FinetuneConfig:
    """YAML < flags; then preset defaults fill what neither set. Bad values -> UserError."""
    yaml_settings = dict(yaml_settings)
    if cli_settings.get("epochs") is not None:  # a flag beats the YAML's other way of saying length
        yaml_settings.pop("max_steps", None)
    if cli_settings.get("max_steps") is not None:
        yaml_settings.pop("epochs", None)
    explicit = {**yaml_settings, **{k: v for k, v in cli_settings.items() if v is not None}}
    settings = dict(explicit)
    for key, value in PRESET_DEFAULTS.get(settings.get("model", "tiny"), {}).items():
        if key == "max_steps" and ("epochs" in explicit or "max_steps" in explicit):
            continue
        settings.setdefault(key, value)
    if cli_settings.get("epochs") is not None and cli_settings.get("max_steps") is not None:
        raise UserError("--epochs and --max-steps: give one of them, not both")
    try:
        return config_class(**settings)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


# Presets: YAML files in the format of a user's --config (training/presets/<name>.yaml), whose
# settings fill what neither the user's YAML nor a flag sets. `hydra-edge presets` lists them.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_files() -> dict[str, Path]:
    """Preset name -> its YAML file."""
    return {path.stem: path for path in sorted(PRESETS_DIR.glob("*.yaml"))}


def _preset_defaults(name: str, path: Path) -> dict:
    settings = read_yaml_config(path)
    if settings.pop("model", None) != name:
        raise UserError(f"{path}: a preset names its own model ('model: {name}')")
    return settings


PRESET_DEFAULTS = {name: _preset_defaults(name, path) for name, path in preset_files().items()}
TINY_PRESET_DEFAULTS = PRESET_DEFAULTS["tiny"]
GEMMA_PRESET_DEFAULTS = PRESET_DEFAULTS["gemma3-270m"]
