"""Experiment trackers (--report-to), through accelerate's: TensorBoard, MLflow and Weights &
Biases see the same numbers metrics.jsonl holds (which stays the source of truth: the UI and the
benchmarks read it), plus the run's settings as hyper-parameters.

Where each writes, unless its own environment variables say otherwise:
    tensorboard   <out>/runs/<run name>/          (tensorboard --logdir <out>/runs)
    mlflow        MLFLOW_TRACKING_URI, else the file store <out>/mlruns (MLFLOW_ALLOW_FILE_STORE
                  is set for it: MLflow 3 keeps that store in maintenance mode), experiment "hydra-edge"
    wandb         project "hydra-edge" (WANDB_PROJECT), files under <out>/wandb (WANDB_MODE=offline
                  keeps them there; `wandb sync` uploads them later)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hydra_edge.choices import TRACKERS
from hydra_edge.errors import UserError

PROJECT = "hydra-edge"
# The module each tracker imports, and the extra that installs it.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def tracker_names(report_to: str) -> list[str]:
    return list(TRACKERS) if report_to == "all" else [] if report_to == "none" else [report_to]


def check_trackers(report_to: str) -> None:
    """Before any model loads: every tracker asked for is installed."""
    for name in tracker_names(report_to):
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"--report-to {report_to}: the {module} package is missing; pip install 'hydra-edge[{extra}]'"
            )


def make_trackers(report_to: str, run_name: str, out_dir: Path) -> list:
    """accelerate GeneralTracker objects for Accelerator(log_with=...)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in tracker_names(report_to):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_name, out_dir / "runs"))
        elif name == "mlflow":
            if "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                # MLflow 3 keeps its file store in maintenance mode behind this switch; the file
                # store needs no database package and sits beside the run.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
            trackers.append(MLflowTracker(PROJECT, run_name=run_name))
        else:
            directory = os.environ.get("WANDB_DIR", str(out_dir))
            project = os.environ.get("WANDB_PROJECT", PROJECT)
            trackers.append(WandBTracker(project, name=run_name, dir=directory))
    return trackers


def hyperparameters(settings: dict) -> dict:
    """The run's settings as trackers accept them: scalars and strings (TensorBoard's hparams
    refuse lists and None)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif value is None:
            value = "none"
        flat[key] = value
    return flat
