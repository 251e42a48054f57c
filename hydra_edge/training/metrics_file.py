"""metrics.jsonl: one row per optimizer step and per held-out eval, the file the UI and the
benchmarks read, kept to each step once across a stop and a --resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from hydra_edge.files import atomic_write_text

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


def tracked_values(row: dict) -> dict:
    """What the trackers get of a training row: the TRACKED fields it has, as train/<name>."""
    return {f"train/{k}": row[k] for k in TRACKED if k in row}


def write_row(metrics: TextIO, row: dict) -> None:
    """One row, flushed at once: the UI follows the file while the run goes on."""
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()


def start_metrics(path: Path, resumed_at: int | None) -> None:
    """Before the first step: a resumed run keeps the rows up to its checkpoint's step; a new run
    starts the file afresh."""
    if resumed_at is not None:
        truncate_metrics(path, resumed_at)
    elif path.exists():
        path.unlink()


def truncate_metrics(path: Path, last_step: int) -> None:
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
