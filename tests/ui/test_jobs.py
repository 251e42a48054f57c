"""The job slot without a server: a process this server did not start still blocks a new one."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hydra_edge.errors import UserError
from hydra_edge.ui.jobs import JobManager, strays


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes through /proc")
def test_a_stray_training_in_the_workspace_blocks_a_start(tmp_path):
    # looks like `python -m hydra_edge finetune` running in the workspace (say, left by a killed UI)
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "hydra_edge", "finetune"], cwd=tmp_path
    )
    try:
        # /proc shows a just-started process's command line only once it runs (empty before)
        deadline = time.monotonic() + 30
        while not strays(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid, _ in strays(tmp_path)] == [stray.pid]
        assert strays(tmp_path / "elsewhere") == []
        jobs = JobManager(tmp_path)
        with pytest.raises(UserError, match=f"still running \\(pid {stray.pid}"):
            jobs.start("train", "r", tmp_path / "runs" / "r", ["--help"], tmp_path / "r.log")
        assert jobs.spawned == 0
    finally:
        stray.kill()
        stray.wait()
    job = JobManager(tmp_path).start("train", "r", tmp_path / "runs" / "r", ["--help"], tmp_path / "r.log")
    assert job.process.wait(60) == 0 and "finetune" in (tmp_path / "r.log").read_text()
