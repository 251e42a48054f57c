"""serve-vllm.sh: run with a stand-in `vllm` on PATH (vLLM needs a GPU), which records the command
line the script hands it."""

from __future__ import annotations

import os
import subprocess

import pytest

from hydra_edge.exporters.vllm_script import max_lora_rank, write_vllm_script


@pytest.mark.parametrize("r, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (33, 64), (512, 512)])
def test_the_rank_is_rounded_up_to_one_vllm_accepts(r, expected):
    assert max_lora_rank(r) == expected


def test_the_script_serves_every_cluster_under_its_name(tmp_path):
    export = tmp_path / "export dir"  # a space: the script must quote its paths
    for name in ("base", "cluster_0", "cluster_2"):
        (export / "peft" / name).mkdir(parents=True)
    script = write_vllm_script(export, [0, 2], r=12)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
    (bin_dir / "vllm").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PORT": "9100"}
    ran = subprocess.run(["bash", str(script), "--max-model-len", "256"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    cwd, *argv = ran.stdout.splitlines()
    assert cwd == str(export)  # paths are relative to the export, wherever it is called from
    assert argv[:2] == ["serve", "peft/base"]
    assert argv[argv.index("--served-model-name") + 1] == "base"
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "16" and argv[argv.index("--max-loras") + 1] == "2"
    modules = argv[argv.index("--lora-modules") + 1 : argv.index("--host")]
    assert modules == ["cluster_0=peft/cluster_0", "cluster_2=peft/cluster_2"]
    assert all((export / m.split("=")[1]).is_dir() for m in modules)
    assert argv[argv.index("--port") + 1] == "9100" and argv[-2:] == ["--max-model-len", "256"]
    assert os.access(script, os.X_OK)
