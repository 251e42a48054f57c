"""Resumable checkpoints: adapter + optimizer + scheduler + RNG + data position.

    <out>/checkpoints/step-000100/
        adapter_model.safetensors   the adapter weights (contract keys)
        optimizer.safetensors       AdamW moments, keyed "<param index>.<name>"
        trainer_state.json          step, scheduler state, param groups, guard counters
        rng.safetensors             torch CPU (and CUDA) generator states

Each is written to a temporary folder and renamed into place, so a crash or a second signal
never leaves a half-written checkpoint behind; trainer_state.json, written last, records the
sha256 of the three tensor files, so a checkpoint damaged later is recognised on --resume and the
previous one is used. Safetensors + JSON only, no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from hydra_edge.adapter.inject import WEIGHTS_FILE, adapter_state_dict, load_adapter_state_dict
from hydra_edge.errors import UserError
from hydra_edge.files import free_bytes, is_out_of_space, megabytes, save_tensors, sha256_of

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TENSOR_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE)
TMP_PREFIX = ".tmp-step-"  # a save in progress (or cut short by a kill)
TRASH_PREFIX = ".old-step-"  # a checkpoint being replaced by a re-save of the same step


def _split_optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """({"<param index>.<name>": tensor}, {same keys: JSON values}). A nested mapping (bitsandbytes'
    8-bit optimizers keep their quantization state in one) is flattened as "<name>/<key>"."""
    tensors, scalars = {}, {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, inner in value.items():
                put(f"{key}/{sub}", inner)
        elif torch.is_tensor(value):  # a copy: bitsandbytes shares its quantization maps between params
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        else:
            scalars[key] = value

    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            put(f"{index}.{name}", value)
    return tensors, scalars


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict) -> Path:
    """Writes step-NNNNNN and keeps the previous good checkpoint beside it.

    Disk use peaks at two checkpoints: every older one is pruned *before* the new one is
    written, but never the newest intact one, so a failed save always leaves a checkpoint to
    resume from. A full disk ends in a UserError that says how much room a checkpoint needs."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    _prune_before_save(out_dir, keep_besides=final)
    adapter = adapter_state_dict(model)
    opt_tensors, opt_scalars = _split_optimizer_state(optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = state
    needed = sum(t.numel() * t.element_size() for part in (adapter, opt_tensors, rng) for t in part.values()) + 2**16
    free = free_bytes(root)
    if free is not None and free < needed:
        raise _no_space(out_dir, final, needed, free)
    tmp = root / f"{TMP_PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_tensors(adapter, tmp / WEIGHTS_FILE)
        save_tensors(opt_tensors, tmp / OPTIMIZER_FILE)
        save_tensors(rng, tmp / RNG_FILE)
        state = {
            **trainer_state,
            "step": step,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "optimizer_param_groups": optimizer.state_dict()["param_groups"],
            "optimizer_scalars": opt_scalars,
            "files": {name: sha256_of(tmp / name) for name in TENSOR_FILES},
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():  # a re-save of the same step: swap, so a good copy always exists
            old = root / f"{TRASH_PREFIX}{step:06d}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(exc):
            raise _no_space(out_dir, final, needed, free_bytes(root)) from exc
        raise
    return final


def _no_space(out_dir: Path, final: Path, needed: int, free: int | None) -> UserError:
    room = f", {megabytes(free)} free" if free is not None else ""
    return UserError(
        f"--out {out_dir}: no room to save checkpoint {final.name} (a checkpoint needs about "
        f"{megabytes(needed)}{room}); "
        f"free some space, then continue with: hydra-edge finetune --out {out_dir} --resume"
    )


def _prune_before_save(out_dir: Path, keep_besides: Path) -> None:
    """Deletes every checkpoint but the newest intact one (and the one about to be re-saved)."""
    done = [p for p in list_checkpoints(out_dir) if p != keep_besides]
    keep = next((p for p in reversed(done) if checkpoint_problem(p) is None), None)
    for old in done:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp(out_dir: Path) -> list[str]:
    """Removes the temporary folders of saves that a kill or a failure cut short; their names."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (bad JSON, a missing, truncated or changed
    file), or None. Checkpoints record the sha256 of their tensor files; older ones without
    it have their safetensors headers checked instead."""
    from safetensors import safe_open

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"{STATE_FILE} unreadable: {type(exc).__name__}"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    shapes = {
        "step": int,
        "bad_in_a_row": int,
        "skipped_total": int,
        "scheduler": dict,
        "optimizer_param_groups": list,
        "optimizer_scalars": dict,
    }
    for key, kind in shapes.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{STATE_FILE}: '{key}' missing or not a {kind.__name__}"
    if state["step"] != int(path.name.split("-")[1]):
        return f"{STATE_FILE}: step {state['step']} does not match the folder name"
    digests = state.get("files")
    for name in TENSOR_FILES:
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if isinstance(digests, dict):
            if sha256_of(file) != digests.get(name):
                return f"{name} changed or truncated (sha256 differs)"
            continue
        try:
            with safe_open(str(file), "pt") as f:
                list(f.keys())
        except Exception as exc:  # SafetensorError: truncated or garbled
            return f"{name} unreadable ({exc})"
    return None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restores model, optimizer, scheduler and RNG; returns the trainer state. A checkpoint
    that passed `checkpoint_problem` but does not fit this run is one UserError line."""
    try:
        return _restore(path, model, optimizer, scheduler)
    except UserError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path}: cannot be restored into this run ({first}); the checkpoint is damaged or from another run"
        ) from exc


def _restore(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    load_adapter_state_dict(model, load_file(str(path / WEIGHTS_FILE)), str(path))
    state = json.loads((path / STATE_FILE).read_text())
    opt_tensors = load_file(str(path / OPTIMIZER_FILE))
    per_param: dict[int, dict] = {}
    for key, value in {**opt_tensors, **state["optimizer_scalars"]}.items():
        index, name = key.split(".", 1)
        *outer, last = name.split("/")
        target = per_param.setdefault(int(index), {})
        for part in outer:
            target = target.setdefault(part, {})
        target[last] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(str(path / RNG_FILE))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in rng))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return state
