"""The UI's one job slot: a `hydra-edge finetune` or `hydra-edge export` subprocess.

The UI has no training logic of its own; it runs the CLI (an argument list, never a shell) and
reads what the CLI writes: `metrics.jsonl` for progress, the log for errors, the run folder for
checkpoints and the adapter. The job lives in the server process, not in a browser session, so
a page reload (or a second browser) finds it and reattaches.

One job at a time: a laptop GPU cannot hold two trainings, and a double click must never start a
second process. `start` takes a lock, checks the slot and spawns under that same lock.
Stop sends SIGTERM: the CLI finishes the current step, saves a resumable checkpoint and exits
with 143 (130 for SIGINT).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra_edge.errors import UserError

STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)
LOG_TAIL_BYTES = 8192


class MetricsReader:
    """Follows a growing metrics.jsonl: reads only the new bytes on each call.

    A resumed run rewrites the file (rows past the checkpoint are dropped); a changed inode, a
    shorter file or a step that goes backwards starts the reading over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict] = []
        self._offset, self._inode, self._partial = 0, None, b""

    def read(self) -> list[dict]:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self.reset()
            return self.rows
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self.reset()
            self._inode = stat.st_ino
        if stat.st_size == self._offset:
            return self.rows
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                row = json.loads(line)
                key = _order(row)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if self.rows and key <= _order(self.rows[-1]):  # rewritten under us: keep what precedes it
                self.rows = [r for r in self.rows if _order(r) < key]
            self.rows.append(row)
        return self.rows


def _order(row: dict) -> tuple[int, bool]:
    """Where a row falls in the file: by step, an `eval` row after its step's training row."""
    return int(row["step"]), row.get("kind") == "eval"


@dataclass
class Job:
    kind: str  # "train" or "export"
    name: str  # the run or export name
    out: Path  # the CLI's --out folder
    argv: list[str]  # arguments after `hydra-edge`
    log_path: Path
    process: subprocess.Popen
    started_at: float = field(default_factory=time.time)
    resumed_from_step: int = 0
    stop_requested: bool = False
    metrics: MetricsReader | None = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def command(self) -> str:
        return "hydra-edge " + shlex.join(self.argv)

    def log_tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(max(0, os.path.getsize(self.log_path) - max_bytes))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def error_message(self) -> str:
        """The CLI's own error line(s), or the last line of output for a crash."""
        lines = [line.strip() for line in self.log_tail().splitlines() if line.strip()]
        errors = [line.removeprefix("hydra-edge: error: ") for line in lines if line.startswith("hydra-edge: error:")]
        if errors:
            return errors[-1]
        return lines[-1] if lines else f"exited with code {self.process.returncode}"


class JobManager:
    """Holds the running job (at most one) and the last job of each kind."""

    def __init__(self, workspace_root: Path) -> None:
        self.workspace_root = Path(workspace_root)
        self._lock = threading.Lock()
        self.last: dict[str, Job] = {}
        self.spawned = 0  # processes started, for tests and the status line

    def active(self) -> Job | None:
        for job in self.last.values():
            if job.running:
                return job
        return None

    def start(
        self, kind: str, name: str, out: Path, argv: list[str], log_path: Path, resumed_from_step: int = 0, check=None
    ) -> Job:
        """Spawns `python -m hydra_edge ARGV`, unless a job is running (UserError).

        check(), when given, runs under the lock just before the spawn: the place for checks
        whose answer a concurrent start could change (is the run folder still free?).
        """
        with self._lock:
            busy = self.active()
            if busy is not None:
                what = "training run" if busy.kind == "train" else "export"
                raise UserError(f"a {what} ({busy.name}) is already running; wait for it to finish or stop it first")
            stray = strays(self.workspace_root)
            if stray:
                pid, command = stray[0]
                raise UserError(
                    f"a hydra-edge process started earlier in this workspace is still running (pid {pid}: "
                    f"{command[:80]}); stop it first (kill -TERM {pid} saves a checkpoint)"
                )
            if check is not None:
                check()
            log_path.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
            with open(log_path, "ab") as log:
                log.write(f"$ hydra-edge {shlex.join(argv)}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    [sys.executable, "-m", "hydra_edge", *argv],
                    cwd=self.workspace_root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.spawned += 1
            job = Job(kind, name, out, list(argv), log_path, process, resumed_from_step=resumed_from_step)
            if kind == "train":
                job.metrics = MetricsReader(out / "metrics.jsonl")
            self.last[kind] = job
            return job

    def stop(self, kind: str, timeout: float = 60.0) -> Job:
        """SIGTERM to the running job of this kind, then waits up to timeout for it to save and exit."""
        job = self.last.get(kind)
        if job is None or not job.running:
            raise UserError("nothing to stop: no training is running" if kind == "train" else "no export is running")
        job.stop_requested = True
        try:
            job.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            job.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # still saving; the status keeps saying "stopping"
        return job

    def wait(self, job: Job, timeout: float | None = None) -> int | None:
        try:
            return job.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stops a running job the way Stop does (a checkpoint is saved), e.g. when the UI exits."""
        job = self.active()
        if job is not None:
            job.stop_requested = True
            job.process.send_signal(signal.SIGTERM)
            try:
                job.process.wait(timeout)
            except subprocess.TimeoutExpired:
                job.process.kill()


def strays(workspace_root: Path) -> list[tuple[int, str]]:
    """`hydra_edge finetune|export` processes running in this workspace that this server did not
    start (say, left by a UI that was killed): (pid, command line). Linux only (/proc); elsewhere
    nothing is found."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    root, found = str(Path(workspace_root).resolve()), []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to look at
            continue
        args = [a.decode("utf-8", "replace") for a in argv if a]
        if cwd == root and "hydra_edge" in args and any(a in ("finetune", "export") for a in args):
            found.append((int(entry.name), " ".join(args)))
    return found
