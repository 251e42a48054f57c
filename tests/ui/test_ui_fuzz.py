"""Crafted run folders and adapters in the workspace, driven through the UI's API: every one is
refused with a message naming what is wrong, before any process starts or any file outside the
workspace is read, and the UI keeps answering. The cases are generated from a fixed seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import torch
from damage import damaged_versions
from gradio_client.exceptions import AppError
from safetensors.torch import load_file, save_file

from hydra_edge.models.tiny import DEMO_TRAIN


class Refusals:
    """Runs API calls that must be refused; keeps every one that was not, reported at the end."""

    def __init__(self, ui_server, client) -> None:
        self.ui_server, self.client = ui_server, client
        self.count, self.failures = 0, []
        self.spawned = ui_server.ctx.jobs.spawned

    def expect(self, case: str, api_name: str, refused: bool = True, **arguments) -> None:
        """refused: the case must be refused; otherwise (a damaged file that may still be valid)
        it may also succeed, but never fail without a message."""
        self.count += 1
        try:
            self.client.predict(**arguments, api_name=api_name)
            if refused:
                self.failures.append(f"{case}: {api_name} accepted it")
        except AppError as exc:
            message = str(exc)
            if "Traceback" in message or len(message) < 20:
                self.failures.append(f"{case}: {api_name}: unhelpful message {message!r}")
        health = httpx.get(self.ui_server.url, timeout=5)
        if health.status_code != 200:
            self.failures.append(f"{case}: the UI answered {health.status_code} afterwards")

    def check(self, at_least: int) -> None:
        print(f"fuzz ui: {self.count} cases, {len(self.failures)} broken")
        assert not self.failures, "\n".join(self.failures[:10])
        assert self.ui_server.ctx.jobs.spawned == self.spawned, "a crafted folder started a process"
        assert self.count >= at_least


def _crafted_run(workspace: Path, name: str, config: dict | bytes) -> str:
    """runs/<name>: a stopped run (one checkpoint) whose run_config.json is `config`."""
    run = workspace / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")
    (run / "run_config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return name


def _adapter_copy(workspace: Path, trained_run: str, name: str, config: bytes) -> str:
    """runs/<name>: the trained run's adapter with adapter_config.json replaced by `config`."""
    adapter = workspace / "runs" / name
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(workspace / trained_run, adapter, ignore=shutil.ignore_patterns("checkpoints"))
    (adapter / "adapter_config.json").write_bytes(config)
    return f"runs/{name}"


def test_fuzz_crafted_run_folders_and_adapters_through_the_ui(ui_server, client, trained_run, tmp_path):
    workspace = ui_server.workspace
    refusals = Refusals(ui_server, client)
    outside = _outside_the_workspace(workspace, tmp_path)
    _crafted_run_configs(refusals, workspace, trained_run, outside)
    _crafted_adapters(refusals, workspace, trained_run, outside)
    refusals.check(at_least=50)


def _outside_the_workspace(workspace: Path, tmp_path: Path) -> Path:
    """A folder outside the workspace with data, a model config and a chat template in it, and the
    workspace's data/escape a symlink leading there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(DEMO_TRAIN.read_text().splitlines()[0] + "\n")
    (outside / "config.json").write_text("{}")
    (outside / "t.jinja").write_text("{{ messages }}")
    (workspace / "data" / "escape").unlink(missing_ok=True)
    (workspace / "data" / "escape").symlink_to(outside)
    return outside


def _crafted_run_configs(refusals: Refusals, workspace: Path, trained_run: str, outside: Path) -> None:
    """A stopped run whose run_config.json names paths outside the workspace -> /resume_training."""
    saved = json.loads((workspace / trained_run / "run_config.json").read_text())
    hostile_settings = [
        {"data": [str(outside / "secret.jsonl")]},
        {"data": ["data/escape/secret.jsonl"]},
        {"data": ["../secret.jsonl"]},
        {"data": ["data/demo/train.jsonl", "/etc/passwd"]},
        {"eval_data": str(outside / "secret.jsonl")},
        {"eval_data": "data/escape/secret.jsonl"},
        {"model": str(outside)},
        {"model": "../../outside"},
        {"chat_template": str(outside / "t.jinja")},
        {"chat_template": "data/escape/t.jinja"},
        {"report_to": "tensorboard", "run_name": str(outside / "events")},
        {"report_to": "tensorboard", "run_name": "../../events"},
        {"run_name": "a/b"},
        {"out": str(outside)},  # ignored by resume (the folder is the run), with the rest crafted
    ]
    for i, change in enumerate(hostile_settings):
        if "out" in change:
            change = {**change, "data": [str(outside / "secret.jsonl")]}
        run = _crafted_run(workspace, f"crafted-{i}", {**saved, **change})
        refusals.expect(f"run_config {change}", "/resume_training", run=run, max_steps=0)
    original = json.dumps(saved).encode()
    for i, (label, content) in enumerate(damaged_versions(original, True, "run_config.json").items()):
        # with data outside the workspace: whatever the damage leaves, nothing may start
        run = _crafted_run(workspace, f"damaged-{i}", content.replace(b"data/demo/", str(outside).encode() + b"/"))
        refusals.expect(f"run_config ({label})", "/resume_training", run=run, max_steps=0)


def _zero_size(tensors: dict) -> dict:
    """Every module's weights with no elements but a rank of 10^9: a terabyte if allocated."""
    return {
        k: torch.zeros(1_000_000_000, 0)
        if k.endswith("hydra_A")
        else torch.zeros(v.shape[0], 0, 1_000_000_000)
        if k.endswith("hydra_B")
        else torch.zeros(v.shape[0], 0)
        for k, v in tensors.items()
    }


def _crafted_adapters(refusals: Refusals, workspace: Path, trained_run: str, outside: Path) -> None:
    """Adapters: a base outside the workspace, shapes that would allocate terabytes, damage -> /chat, /export."""
    weights = load_file(str(workspace / trained_run / "adapter_model.safetensors"))
    config = json.loads((workspace / trained_run / "adapter_config.json").read_text())
    hostile_adapters = [
        ("base outside", {"base_model": str(outside)}, None),
        ("base through a link", {"base_model": "data/escape"}, None),
        ("base with ..", {"base_model": "../outside"}, None),
        ("base /etc", {"base_model": "/etc"}, None),
        ("r = 10^9 with zero-size weights", {"r": 1_000_000_000}, _zero_size),
        ("heads = 10^6", {"heads": 1_000_000}, None),
    ]
    for i, (label, change, reshape) in enumerate(hostile_adapters):
        crafted = json.dumps({**config, **change}).encode()
        source = _adapter_copy(workspace, trained_run, f"crafted-adapter-{i}", crafted)
        if reshape is not None:
            save_file(reshape(weights), str(workspace / source / "adapter_model.safetensors"))
        refusals.expect(label, "/chat", message="hi", history=[], base_history=[], source=source, system_prompt="")
        refusals.expect(label, "/export", adapter=source, mode="adapters", precision="fp32", name=f"x{i}")
    damaged = damaged_versions(json.dumps(config).encode(), True, "adapter_config.json")
    for i, (label, content) in enumerate(damaged.items()):
        source = _adapter_copy(workspace, trained_run, f"damaged-adapter-{i}", content)
        refusals.expect(
            f"adapter_config.json ({label})",
            "/chat",
            refused=False,
            message="hi",
            history=[],
            base_history=[],
            source=source,
            system_prompt="",
            max_tokens=2,
        )
