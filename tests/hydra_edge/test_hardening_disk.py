"""Checkpoints on full disks, damaged checkpoints and read-only --out: each ends in one
`hydra-edge: error:` line and exit code 2, never a traceback, and nothing that was saved is lost."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import FP32, assert_one_line_error, fill_disk, read_only, run_in_process, small_disk
from hardening_helpers import truncate
from safetensors.torch import load_file

from hydra_edge.errors import UserError
from hydra_edge.models.tiny import DEMO_TRAIN
from hydra_edge.training.checkpoint import list_checkpoints, save_checkpoint
from hydra_edge.training.config import build_config
from hydra_edge.training.finetune import run_finetune

# -- 4. checkpoints: a full disk, pruning, stale temp folders, damaged checkpoints ---------------


def _toy_training():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_a_save_needs_room_for_one_extra_checkpoint_only(tmp_path, monkeypatch):
    import safetensors.torch

    model, optimizer, scheduler = _toy_training()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"bad_in_a_row": 0, "skipped_total": 0})
    complete_while_writing = []
    real_save = safetensors.torch.save_file

    def watching_save(tensors, path, **kw):
        complete_while_writing.append(len(list_checkpoints(tmp_path)))
        return real_save(tensors, path, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", watching_save)
    save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"bad_in_a_row": 0, "skipped_total": 0})
    assert max(complete_while_writing) == 1  # the previous checkpoint only, never two beside the new one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]


def test_pruning_never_deletes_the_last_good_checkpoint(tmp_path):
    model, optimizer, scheduler = _toy_training()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"bad_in_a_row": 0, "skipped_total": 0})
    truncate(tmp_path / "checkpoints" / "step-000004" / "optimizer.safetensors")  # the newest is damaged
    save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"bad_in_a_row": 0, "skipped_total": 0})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000006"]


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_full_disk_during_a_checkpoint_says_how_much_room_it_needs(tmp_path):
    out = tmp_path / "disk" / "run"
    with small_disk(tmp_path / "disk", "16m"):

        def fill_after_first_step(step, model, skipped):
            if step == 1:
                fill_disk(out, leave=64 * 1024)  # room for metrics rows, not for a checkpoint

        config = build_config({}, {**FP32, "data": [str(DEMO_TRAIN)], "out": str(out), "max_steps": 4, "save_every": 2})
        with pytest.raises(
            UserError, match=r"no room to save checkpoint step-000002 \(a checkpoint needs about [\d.]+ MB"
        ):
            run_finetune(config, on_step=fill_after_first_step)
        assert not list((out / "checkpoints").glob(".tmp-step-*"))


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_out_of_space_while_writing_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    """The same full disk when the free space cannot be known in advance: the write itself fails."""
    import hydra_edge.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "free_bytes", lambda folder: None)
    out = tmp_path / "disk" / "run"
    with small_disk(tmp_path / "disk", "16m"):

        def fill_after_first_step(step, model, skipped):
            if step == 1:
                fill_disk(out, leave=64 * 1024)

        config = build_config({}, {**FP32, "data": [str(DEMO_TRAIN)], "out": str(out), "max_steps": 4, "save_every": 2})
        with pytest.raises(UserError, match="no room to save checkpoint step-000002"):
            run_finetune(config, on_step=fill_after_first_step)
        assert not list((out / "checkpoints").glob(".tmp-step-*"))


def test_full_disk_before_training_is_one_line(tmp_path):
    out = tmp_path / "disk" / "run"
    with small_disk(tmp_path / "disk", "1m"):
        fill_disk(tmp_path / "disk", leave=16 * 1024)  # the --out probe fits, the clusters do not
        result = run_in_process("finetune", "--out", str(out), "--max-steps", "2", "--heads", "2")
    assert_one_line_error(result, "disk is full")


def test_stale_temp_folders_are_removed_at_start(run_copy):
    stale = run_copy / "checkpoints" / ".tmp-step-000004-99999"
    stale.mkdir()
    (stale / "optimizer.safetensors").write_bytes(b"half a file")
    result = run_in_process("finetune", "--out", str(run_copy), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not stale.exists() and "removed 1 unfinished save" in result.stderr


@pytest.mark.parametrize("damage", ["truncated optimizer", "bad JSON", "changed adapter"])
def test_resume_falls_back_to_the_previous_checkpoint(run_copy, checkpointed_run, damage):
    latest = run_copy / "checkpoints" / "step-000004"
    if damage == "truncated optimizer":
        truncate(latest / "optimizer.safetensors")
    elif damage == "bad JSON":
        (latest / "trainer_state.json").write_text('{"step": 4, "sched')
    else:
        data = bytearray((latest / "adapter_model.safetensors").read_bytes())
        data[-5] ^= 0x01  # one bit of one weight
        (latest / "adapter_model.safetensors").write_bytes(bytes(data))
    result = run_in_process("finetune", "--out", str(run_copy), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step-000004 is damaged" in result.stderr and "falling back to step-000002" in result.stderr
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    resumed = load_file(str(run_copy / "adapter_model.safetensors"))
    straight = load_file(str(checkpointed_run / "adapter_model.safetensors"))
    for key, value in straight.items():  # steps 3-4 redone from step 2 give the same adapter
        assert torch.equal(resumed[key], value), key


def test_resume_with_every_checkpoint_damaged_is_one_line(run_copy):
    for checkpoint in list_checkpoints(run_copy):
        (checkpoint / "trainer_state.json").write_text("[]")
    result = run_in_process("finetune", "--out", str(run_copy), "--resume")
    assert_one_line_error(result, "every checkpoint", "damaged")


# -- 5. read-only --out ---------------------------------------------------------------------------


def test_read_only_out_for_a_new_run(tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        result = run_in_process("finetune", "--out", str(tmp_path / "ro" / "run"), "--max-steps", "1")
    assert_one_line_error(result, "--out", "cannot write there")


def test_read_only_out_on_resume(run_copy):
    before = sorted(p.name for p in run_copy.rglob("*"))
    with read_only(run_copy):
        result = run_in_process("finetune", "--out", str(run_copy), "--resume")
    assert_one_line_error(result, f"--out {run_copy}", "cannot write there")
    assert sorted(p.name for p in run_copy.rglob("*")) == before


def test_read_only_out_for_an_export(adapter_copy, tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        result = run_in_process("export", "--adapter", str(adapter_copy), "--out", str(tmp_path / "ro" / "export"))
    assert_one_line_error(result, "--out", "cannot write there")


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = run_in_process("finetune", "--out", str(tmp_path / "a-file"), "--max-steps", "1")
    assert_one_line_error(result, f"--out {tmp_path / 'a-file'}", "cannot write there")
