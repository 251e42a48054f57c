"""The adapter folder's contract: `AdapterConfig`, which is also adapter_config.json.

<out>/adapter_config.json        format version, base model + fingerprint, quant, rank,
                                 alpha, heads, dropout, target_modules, tokenizer, chat template
<out>/adapter_model.safetensors  <module>.hydra_A [r, in], .hydra_B [N, out, r],
                                 .hydra_router [N, in]

Loading checks the file field by field and against the weights file's header (shapes only, no
tensor read), so a damaged or crafted config is refused before any layer is built from it:
`heads: 1000000` would otherwise allocate gigabytes first. Fields added later get defaults, so
older adapters of the same format version still load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from hydra_edge.choices import Dtype, Quant
from hydra_edge.errors import UserError
from hydra_edge.files import atomic_write_text, read_json_object

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_KEYS = ("hydra_A", "hydra_B", "hydra_router")
# Keys adapters of this format version were first written with: read under the names the CLI uses.
LEGACY_KEYS = {"r": "rank", "quantization": "quant"}


@dataclass
class AdapterConfig:
    base_model: str  # what the user named: a preset, a Hub id, a folder or a .gguf file
    base_fingerprint: str  # of the base weights, so another base is refused
    quant: Quant
    rank: int
    alpha: float
    heads: int
    target_modules: list[str]
    dtype: Dtype = "bf16"  # what the base computed in during training (loading repeats it)
    base_model_resolved: str | None = None
    dropout: float = 0.0
    head_init: str = "zero"
    router: str = "learned"
    head_dropout: float = 0.0
    router_temperature: float = 1.0  # the router's logits are divided by it (inference too)
    router_top_k: int = 0  # 0: every head; else each token's k largest gates, renormalised
    targets: str | None = None  # the --targets that chose target_modules
    tokenizer: str | None = None
    chat_template: str | None = None
    hydra_edge_version: str | None = None
    training: dict = field(default_factory=dict)  # steps, final_loss, skipped_steps

    @property
    def scaling(self) -> float:
        """The branch's scale alpha / rank."""
        return self.alpha / self.rank

    def save(self, out_dir: Path) -> None:
        data = {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}
        atomic_write_text(Path(out_dir) / CONFIG_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, adapter_dir: Path) -> AdapterConfig:
        """The checked config of an adapter folder; UserError naming the file otherwise."""
        adapter_dir = Path(adapter_dir)
        path = adapter_dir / CONFIG_FILE
        if not adapter_dir.is_dir():
            raise UserError(f"--adapter {adapter_dir}: no such folder")
        if not path.is_file() or not (adapter_dir / WEIGHTS_FILE).is_file():
            raise UserError(
                f"--adapter {adapter_dir}: not a hydra-edge adapter (needs {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}); point it at the --out folder of a finetune run"
            )
        raw = read_json_object(path, "the adapter folder is damaged; retrain or restore it")
        raw = {LEGACY_KEYS.get(key, key): value for key, value in raw.items()}
        if raw.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path}: format_version {raw.get('format_version')!r} is not supported by this "
                f"hydra-edge (expects {FORMAT_VERSION}); upgrade hydra-edge or retrain"
            )
        _check_fields(raw, path)
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        _check_weight_shapes(config, adapter_dir / WEIGHTS_FILE)
        return config


def _is_whole(value, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(annotation) -> tuple:
    return get_args(annotation)


_RULES = {
    "base_model": (lambda v: isinstance(v, str) and bool(v.strip()), "a model name or folder"),
    "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "quant": (lambda v: v in _choice(Quant), f"one of {', '.join(_choice(Quant))}"),
    "rank": (_is_whole, "a whole number >= 1"),
    "heads": (_is_whole, "a whole number >= 1"),
    "alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "target_modules": (
        lambda v: (
            isinstance(v, list) and bool(v) and all(isinstance(m, str) and m for m in v) and len(set(v)) == len(v)
        ),
        "a non-empty list of distinct module names",
    ),
}
_OPTIONAL_RULES = {
    "dtype": (lambda v: v in _choice(Dtype), " or ".join(_choice(Dtype))),
    "training": (lambda v: isinstance(v, dict), "a mapping"),
    "router_temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "router_top_k": (lambda v: _is_whole(v, least=0), "a whole number >= 0"),
}


def _check_fields(raw: dict, path: Path) -> None:
    for key, (ok, expected) in {**_RULES, **_OPTIONAL_RULES}.items():
        if key not in raw:
            if key in _OPTIONAL_RULES:
                continue
            raise UserError(f"{path}: '{key}' is missing; the adapter folder is damaged, retrain or restore it")
        if not ok(raw[key]):
            raise UserError(f"{path}: '{key}' is {raw[key]!r}, expected {expected}; the adapter folder is damaged")


def _check_weight_shapes(config: AdapterConfig, weights_path: Path) -> None:
    """Every target module has hydra_A (r, in), hydra_B (heads, out, r) and hydra_router
    (heads, in) in the weights file, and nothing else is there. Reads the header only
    (safetensors checks that it covers the file exactly, so a truncated file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), "pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # SafetensorError and friends: damaged or truncated file
        raise UserError(f"{weights_path}: cannot read adapter weights ({exc}); the file is damaged") from exc
    r, heads = config.rank, config.heads
    if config.router_top_k > heads:
        raise UserError(
            f"{weights_path.parent / CONFIG_FILE}: router_top_k {config.router_top_k} exceeds heads={heads}; "
            "the adapter folder is damaged"
        )
    expected = {f"{m}.{k}" for m in config.target_modules for k in ADAPTER_KEYS}
    if set(shapes) != expected:
        odd = sorted(set(shapes) ^ expected)[0]
        raise UserError(
            f"{weights_path}: its tensors do not match adapter_config.json's target_modules "
            f"(e.g. {odd}); the adapter folder is damaged"
        )
    for module in config.target_modules:
        a, b, router = (shapes[f"{module}.{k}"] for k in ADAPTER_KEYS)
        fits = (
            all(size >= 1 for size in a + b + router)  # a zero-size tensor stores nothing yet claims r
            and len(a) == 2
            and len(b) == 3
            and len(router) == 2
            and a[0] == r
            and b[0] == heads
            and b[2] == r
            and router == [heads, a[1]]
        )
        if not fits:
            raise UserError(
                f"{weights_path}: {module} has A {a}, B {b}, router {router}, but adapter_config.json says "
                f"r={r}, heads={heads}; the adapter folder is damaged"
            )
