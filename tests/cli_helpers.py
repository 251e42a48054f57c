"""Running the CLI in-process and the conditions the hardening tests need (a read-only folder,
a full disk), made for real: chattr/chmod and a small tmpfs, never a mocked errno."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# A small run in fp32 end to end, so a resumed run is bit-comparable with a straight one (see
# test_train.py); --data is named, so no held-out scoring runs at the end.
FP32 = {
    "quant": "none",
    "mixed_precision": "no",
    "dropout": 0.0,
    "heads": "2",
    "batch_size": 4,
    "seq_len": 64,
    "grad_accum": 1,
}


def free_port() -> int:
    """A loopback port nothing listens on right now (for servers a test starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m hydra_edge ARGS` in a subprocess, as a user would from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "hydra_edge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(*args: str) -> Result:
    """`hydra-edge ARGS` in this process (fast: no interpreter start, imports reused). An
    exception that escapes main() propagates, so a traceback fails the calling test."""
    from hydra_edge.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *needles) -> None:
    """Exit code 2, no traceback, exactly one `hydra-edge: error:` line holding every needle."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hydra-edge: error:"), result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@contextlib.contextmanager
def read_only(folder: Path):
    """Makes `folder` unwritable for this process: chmod for a normal user; for root, who
    ignores modes, the immutable attribute (chattr +i)."""
    folder = Path(folder)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "8m"):
    """A real, small filesystem (tmpfs) mounted at `folder`: writes past `size` fail with ENOSPC."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]  # CI machines run tests as root or with sudo
    subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run([*sudo, "umount", "-l", str(folder)], check=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fills the filesystem holding `folder` until `leave` bytes (or fewer) are free."""
    import shutil

    filler = Path(folder) / "filler.bin"
    with open(filler, "wb") as f:
        while True:
            free = shutil.disk_usage(folder).free
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(1 << 20, free - leave))
                f.flush()
            except OSError:
                break
    return filler


def conversation_routed_by_its_system_prompt(adapter_dir: Path) -> tuple[str, str, int]:
    """(system, prompt, cluster): a demo conversation whose system prompt moves it to another
    cluster than its last message alone would get; `cluster` is what the whole conversation
    routes to (data.routing_text), the rule training and every engine follow."""
    from hydra_edge.clusters.fit import load_clusters
    from hydra_edge.data.records import read_records, routing_text
    from hydra_edge.models.tiny import DEMO_EVAL

    clusters = load_clusters(adapter_dir)
    prompts = [r.messages[0]["content"] for r in read_records(DEMO_EVAL)]
    alone = clusters.assign(prompts).tolist()
    for system, system_cluster in zip(prompts, alone):
        for prompt, prompt_cluster in zip(prompts, alone):
            if prompt_cluster == system_cluster:
                continue
            conversation = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            routed = int(clusters.assign([routing_text(conversation)])[0])
            if routed != prompt_cluster:
                return system, prompt, routed
    raise AssertionError("no demo system prompt changes the route; the check needs one")
