"""Helpers for the UI tests (a plain module: test files import it, conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Small and quick: the tiny preset, short sequences, small batches, no held-out scoring, and
# checkpoints only when stopped or done.
QUICK = {"eval_data": "", "seq_len": 64, "batch_size": 4, "save_every": 0}
UPLOAD_LIMIT_MB = 1
ROOT = Path(__file__).resolve().parents[2]


def hydra_edge(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m hydra_edge ARGS` in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "hydra_edge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def wait_until_done(client, timeout: float = 300) -> dict:
    """Polls training_status until the run no longer runs; returns the final status."""
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        status = client.predict(api_name="/training_status")
        if status["state"] not in ("running", "stopping"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"training still running after {timeout}s: {status.get('message')}")


def wait_for_step(client, step: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        status = client.predict(api_name="/training_status")
        if status["step"] >= step or status["state"] not in ("running", "stopping"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s: {status.get('message')}")


def finetune_processes(run_folder: str) -> list[str]:
    """Command lines of the live `hydra_edge finetune` processes of this run folder: started from
    its settings file (`--config RUN/config.yaml`) or resumed (`--out RUN --resume`)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    ours = (f"--out {run_folder}", f"--config {run_folder}/")
    return [line for line in ps if "hydra_edge finetune" in line and any(mark in line for mark in ours)]
