"""The state of the UI's training run, read back from what the CLI writes (metrics.jsonl, the
log, checkpoints, eval_results.json): what the Train tab shows and the training_status API
returns. No gradio here."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hydra_edge.ui.jobs import STOPPED_CODES, Job, JobManager
from hydra_edge.ui.workspace import Workspace

MAX_PLOT_POINTS = 2000


def metric_rows(jobs: JobManager) -> list[dict]:
    """Every metrics row of the current (or last) run, for the plots: training rows and, with
    --eval-every, `eval` rows (held-out loss) between them."""
    job = jobs.last.get("train")
    return list(job.metrics.read()) if job is not None and job.metrics is not None else []


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out eval rows)."""
    return [r for r in rows if r.get("kind") != "eval"], [r for r in rows if r.get("kind") == "eval"]


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
    from hydra_edge.training.checkpoint import list_checkpoints

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
    rows, evals = split_rows(job.metrics.read())
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
        "held_out_loss": evals[-1]["eval_loss"] if evals else None,
        "router": latest_router(evals),
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


def latest_router(evals: list[dict]) -> dict | None:
    """The router's health at the latest held-out eval (the eval row's router_summary: routing
    spread, head cosine, largest and per-head share), its step, and whether that eval found the
    heads collapsed; None before the first eval, or from a run that wrote no summary."""
    summary = evals[-1].get("router_summary") if evals else None
    if not summary:
        return None
    return {**summary, "step": evals[-1]["step"], "heads_collapsed": bool(evals[-1].get("heads_collapsed"))}


def _progress_line(status: dict) -> str:
    parts = [
        f"step {status['step']}/{status['total_steps']}",
        f"loss {status['loss']:.4f}",
        f"lr {status['lr']:.2e}",
        f"{status['tokens_per_s']:,.0f} tokens/s",
    ]
    if status.get("held_out_loss") is not None:
        parts.insert(2, f"held-out loss {status['held_out_loss']:.4f}")
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
