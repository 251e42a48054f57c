"""Resumable checkpoints: adapter + optimizer + scheduler + RNG + data position.

    <out>/checkpoints/step-000100/
        adapter_model.safetensors   the adapter weights (contract keys)
        optimizer.safetensors       AdamW moments, keyed "<param index>.<name>"
        trainer_state.json          step, scheduler state, param groups, guard counters
        rng.safetensors             torch CPU (and CUDA) generator states

Each is written to a temporary folder and renamed into place, so a crash or a second signal
never leaves a half-written checkpoint behind. Safetensors + JSON only, no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from hydra_edge.adapter import WEIGHTS_FILE, adapter_state_dict, load_adapter_state_dict

CHECKPOINTS_DIR = "checkpoints"
KEEP_LAST = 2


def _split_optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, scalars


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict) -> Path:
    from safetensors.torch import save_file

    root = Path(out_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(adapter_state_dict(model), str(tmp / WEIGHTS_FILE))
    opt_tensors, opt_scalars = _split_optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = state
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        **trainer_state,
        "step": step,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "optimizer_param_groups": optimizer.state_dict()["param_groups"],
        "optimizer_scalars": opt_scalars,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(out_dir)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restores model, optimizer, scheduler and RNG; returns the trainer state."""
    from safetensors.torch import load_file

    load_adapter_state_dict(model, load_file(str(path / WEIGHTS_FILE)), str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in {**opt_tensors, **state["optimizer_scalars"]}.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in rng))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return state
