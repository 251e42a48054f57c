"""Shared fixtures: one hydra-edge home per test session, so the tiny preset is built once."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from cli_helpers import run_cli, run_in_process

_HOME = tempfile.mkdtemp(prefix="hydra-edge-test-home-")
os.environ["HYDRA_EDGE_HOME"] = _HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from hydra_edge.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`hydra-edge finetune` with no arguments, run once: the embedded default end to end."""
    cwd = tmp_path_factory.mktemp("demo")
    # About a minute on a CPU with native bf16; some CPUs (AVX2-only) run bf16 matmuls ~100x
    # slower than fp32, and the 300 demo steps then take a quarter of an hour.
    result = run_cli("finetune", cwd=cwd, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "hydra-out", result


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_dir):
    """A small HydraLoRA adapter on the NF4 tiny preset, trained in-process (a few seconds)."""
    from hydra_edge.training.config import build_config
    from hydra_edge.training.finetune import run_finetune

    out = tmp_path_factory.mktemp("adapter") / "run"
    run_finetune(build_config({}, {"out": str(out), "max_steps": 60, "heads": "3", "eval_data": None}))
    return out


@pytest.fixture(scope="session")
def checkpointed_run(tmp_path_factory) -> Path:
    """A finished 4-step fp32 run with checkpoints at steps 2 and 4 (tests copy it before changing it)."""
    from cli_helpers import FP32

    from hydra_edge.models.tiny import DEMO_TRAIN
    from hydra_edge.training.checkpoint import list_checkpoints
    from hydra_edge.training.config import build_config
    from hydra_edge.training.finetune import run_finetune

    out = tmp_path_factory.mktemp("ckpt") / "run"
    settings = {**FP32, "data": [str(DEMO_TRAIN)], "out": str(out), "max_steps": 4, "save_every": 2}
    run_finetune(build_config({}, settings))
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    return out


@pytest.fixture(scope="session")
def adapter_export(trained_adapter, tmp_path_factory) -> Path:
    """An `adapters`-mode fp32 export of trained_adapter (tests copy it before damaging it)."""
    from hydra_edge.exporters.formats.onnx import export

    out = tmp_path_factory.mktemp("adapter-export") / "onnx"
    export(trained_adapter, out, mode="adapters", log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def gguf_export(trained_adapter, tmp_path_factory) -> Path:
    """A `--format gguf` export of trained_adapter with a Q8_0 base (tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("gguf") / "export"
    args = ("--adapter", str(trained_adapter), "--out", str(out), "--format", "gguf", "--gguf-base", "q8_0")
    result = run_in_process("export", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validated in llama.cpp" in result.stderr
    return out


@pytest.fixture(scope="session")
def plain_base(trained_adapter, tmp_path_factory) -> Path:
    """trained_adapter's base, dequantized to a float32 folder: what exports are built from."""
    from hydra_edge.adapter.config import AdapterConfig
    from hydra_edge.exporters.merge import save_plain_base

    return save_plain_base(AdapterConfig.load(trained_adapter), tmp_path_factory.mktemp("plain") / "base")


@pytest.fixture(scope="session")
def small_eval(tmp_path_factory) -> Path:
    """The first two rows of the demo's held-out split: eval/chat calls that must be quick."""
    from hydra_edge.models.tiny import DEMO_EVAL

    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:2]))
    return path


# Fixtures that train, export or launch something (minutes on two cores): a test that uses one is
# `slow`, and `pytest -m "not slow"` leaves it out. Tests that do such work in their own body
# carry @pytest.mark.slow (or their module a pytestmark) themselves.
SLOW_FIXTURES = {
    "demo_run",
    "trained_adapter",
    "checkpointed_run",
    "run_copy",
    "adapter_copy",
    "exported",
    "plain_base",
    "demo_scores",
    "adapter_export",
    "gguf_export",
    "llama_server",
    "gemma_run",
    "tiny_gguf",
    "ui_server",
    "client",
    "trained_run",
    "api_server",
    "busy_server",
    "proxy_server",
    "torch_server",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
