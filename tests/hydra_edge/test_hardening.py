"""Damaged files, crafted configs, full and read-only disks: each ends in one `hydra-edge: error:`
line and exit code 2, never a traceback, and nothing that was saved is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import FP32, assert_one_line_error, fill_disk, read_only, run_in_process, small_disk
from safetensors.torch import load_file, save_file

from hydra_edge.checkpoint import list_checkpoints, save_checkpoint
from hydra_edge.config import build_config
from hydra_edge.errors import UserError
from hydra_edge.finetune import run_finetune
from hydra_edge.tiny import DEMO_EVAL, DEMO_TRAIN


@pytest.fixture
def run_copy(checkpointed_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(checkpointed_run, copy)
    return copy


@pytest.fixture
def adapter_copy(trained_adapter, tmp_path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(trained_adapter, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def adapter_commands(adapter: Path, small_eval: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "chat": [
            "chat",
            "--adapter",
            str(adapter),
            "--prompt",
            "What is the capital of Japan?",
            "--max-new-tokens",
            "2",
        ],
        "eval": ["eval", "--adapter", str(adapter), "--data", str(small_eval), "--max-new-tokens", "2"],
        "export": ["export", "--adapter", str(adapter), "--out", str(tmp_path / "export")],
    }


# -- 2. a crafted adapter_config.json is refused before any layer is built ------------------------


@pytest.mark.parametrize("command", ["chat", "eval", "export"])
@pytest.mark.parametrize(
    "change",
    [
        {"heads": 1_000_000},
        {"r": 1_000_000_000},
        {"r": -3},
        {"heads": "three"},
        {"target_modules": []},
        {"quantization": "int2"},
    ],
)
def test_crafted_adapter_config_is_refused_before_allocating(adapter_copy, small_eval, tmp_path, command, change):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config.update(change)
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    result = run_in_process(*adapter_commands(adapter_copy, small_eval, tmp_path)[command])
    assert_one_line_error(result, "adapter_config.json", "damaged")
    assert not (tmp_path / "export").exists()


def test_adapter_weights_disagreeing_with_the_config_are_refused(adapter_copy, small_eval, tmp_path):
    weights = load_file(str(adapter_copy / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("hydra_B"))
    weights[key] = torch.cat([weights[key], weights[key]])  # (2N, out, r): one head too many per copy
    save_file(weights, str(adapter_copy / "adapter_model.safetensors"))
    result = run_in_process(*adapter_commands(adapter_copy, small_eval, tmp_path)["chat"])
    assert_one_line_error(result, "adapter_model.safetensors", "heads=")


def _rewrite_adapter(adapter: Path, config_change: dict, reshape) -> None:
    """adapter_config.json updated by config_change and every module's (A, B, router) replaced
    by reshape(A, B, router): a crafted adapter whose header agrees with its config."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(config_change)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    crafted = {}
    for module in config["target_modules"]:
        keys = [f"{module}.{k}" for k in ("hydra_A", "hydra_B", "hydra_router")]
        crafted.update(zip(keys, (t.contiguous() for t in reshape(*(weights[k] for k in keys)))))
    save_file(crafted, str(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize("command", ["chat", "eval", "export"])
def test_zero_size_weights_with_a_huge_rank_are_refused(adapter_copy, small_eval, tmp_path, command):
    r = 1_000_000_000  # with the base's real dims, the layers would allocate ~1 TB

    def empty(a, b, router):
        heads = b.shape[0]
        return torch.zeros(r, 0), torch.zeros(heads, 0, r), torch.zeros(heads, 0)

    _rewrite_adapter(adapter_copy, {"r": r}, empty)
    result = run_in_process(*adapter_commands(adapter_copy, small_eval, tmp_path)[command])
    assert_one_line_error(result, "adapter_model.safetensors", "damaged")


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_weights_that_do_not_fit_the_base_layers_are_refused_before_building(
    adapter_copy, small_eval, tmp_path, command
):
    # A (r, in - 1) and router (N, in - 1): consistent with each other and the config, not the base
    _rewrite_adapter(adapter_copy, {}, lambda a, b, router: (a[:, 1:], b, router[:, 1:]))
    result = run_in_process(*adapter_commands(adapter_copy, small_eval, tmp_path)[command])
    assert_one_line_error(result, "adapter_model.safetensors", "this base's layer needs")


# -- 6. damaged clusters, router, run config, manifest, target modules, model weights -------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CLUSTER_DAMAGE = {
    "empty clusters.json": ("clusters.json", lambda p: p.write_text("")),
    "garbled clusters.json": ("clusters.json", lambda p: p.write_text('{"k": 3, "vocabulary": [1, 2')),
    "clusters.json without vocabulary": ("clusters.json", lambda p: p.write_text('{"k": 3}')),
    "truncated clusters.safetensors": ("clusters.safetensors", _truncate),
}


@pytest.mark.parametrize("command", ["chat", "eval", "export"])
@pytest.mark.parametrize("damage", sorted(CLUSTER_DAMAGE))
def test_damaged_cluster_router_is_one_line(adapter_copy, small_eval, tmp_path, command, damage):
    name, spoil = CLUSTER_DAMAGE[damage]
    spoil(adapter_copy / name)
    result = run_in_process(*adapter_commands(adapter_copy, small_eval, tmp_path)[command])
    assert_one_line_error(result, name)
    if command == "export":  # a broken router is refused, not exported
        assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export-*"))


def test_router_whose_centroids_do_not_fit_is_refused(adapter_copy, tmp_path):
    arrays = load_file(str(adapter_copy / "clusters.safetensors"))
    arrays["centroids"] = arrays["centroids"][:, :3].contiguous()
    save_file(arrays, str(adapter_copy / "clusters.safetensors"))
    result = run_in_process("export", "--adapter", str(adapter_copy), "--out", str(tmp_path / "export"))
    assert_one_line_error(result, "clusters.safetensors", "centroids")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('{"max_steps": 4, "learning_rate": 0.1}', "unknown key 'learning_rate'"),
        ('{"rank": "eight"}', "rank"),
        ('{"rank": 0}', "--rank"),
    ],
)
def test_damaged_run_config_on_resume_is_one_line(run_copy, content, needle):
    (run_copy / "run_config.json").write_text(content)
    result = run_in_process("finetune", "--out", str(run_copy), "--resume")
    assert_one_line_error(result, "run_config.json", needle)


@pytest.mark.parametrize("manifest", ["", "{garbled", '{"mode": "adapters", "clusters": [0]}', '{"files": []}', "[]"])
def test_damaged_export_manifest_is_one_line(tmp_path, manifest):
    export = tmp_path / "export"
    export.mkdir()
    (export / "export_manifest.json").write_text(manifest)
    result = run_in_process("chat", "--onnx", str(export), "--prompt", "hi")
    assert_one_line_error(result, "export_manifest.json")


def test_target_module_that_is_not_in_the_base_is_refused(adapter_copy, small_eval, tmp_path):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    gone, renamed = config["target_modules"][0], config["target_modules"][0] + "_missing"
    config["target_modules"][0] = renamed
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    weights = {
        k.replace(gone + ".", renamed + "."): v
        for k, v in load_file(str(adapter_copy / "adapter_model.safetensors")).items()
    }
    save_file(weights, str(adapter_copy / "adapter_model.safetensors"))
    result = run_in_process(*adapter_commands(adapter_copy, small_eval, tmp_path)["chat"])
    assert_one_line_error(result, renamed, "not a linear layer")


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_model_folder_with_a_pickle_that_is_not_a_state_dict(tiny_dir, tmp_path):
    import pickle

    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_dir.iterdir():
        if file.suffix == ".json":
            shutil.copy(file, folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    result = run_in_process(
        "finetune", "--model", str(folder), "--data", str(DEMO_EVAL), "--out", str(tmp_path / "o"), "--max-steps", "1"
    )
    assert_one_line_error(result, f"--model {folder}", "safetensors")


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
    _truncate(tmp_path / "checkpoints" / "step-000004" / "optimizer.safetensors")  # the newest is damaged
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
    import hydra_edge.checkpoint as checkpoint

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
        _truncate(latest / "optimizer.safetensors")
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


# -- 7. hostile data rows: FILE:LINE problems, never a traceback ----------------------------------

DEEP = "[" * 200_000 + "]" * 200_000
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _problem_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if ": " in line and "(" in line and "format" not in line]


def test_deeply_nested_jsonl_row_is_a_line_problem(tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + '{"messages": ' + DEEP + "}\n" + json.dumps(GOOD) + "\n")
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, "1 invalid row")
    assert f"{data}:2: malformed JSON (nested too deeply" in result.stdout
    assert "2 valid rows, 1 invalid" in result.stdout


def test_deeply_nested_json_array_names_its_line(tmp_path):
    data = tmp_path / "deep.json"
    data.write_text("[\n" + json.dumps(GOOD) + ",\n" + '{"messages": ' + DEEP + "}\n]\n")
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result)
    assert f"{data}:3: malformed JSON (nested too deeply" in result.stdout


def test_csv_cell_over_the_field_limit_is_a_row_problem(tmp_path):
    data = tmp_path / "big.csv"
    data.write_text('prompt,completion\nHi,Hello\n"' + "x" * 140_000 + '",Hello\nBye,Goodbye\n')
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, "1 invalid row")
    assert f"{data}:row 2: malformed CSV (a cell is longer than 131,072 characters" in result.stdout
    assert "2 valid rows, 1 invalid" in result.stdout
    result = run_in_process("finetune", "--data", str(data), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "--skip-invalid")
    assert result.stderr.startswith(f"{data}:row 2: malformed CSV")


def test_validate_lists_every_problem_when_no_row_is_valid(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": []}\n{oops\n{"text": 3}\n')
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, "3 invalid rows")
    for line in (1, 2, 3):
        assert f"{data}:{line}: " in result.stdout, result.stdout
    assert "0 valid rows, 3 invalid" in result.stdout


@pytest.mark.parametrize(
    "row",
    [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "And then?"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "And then?"},
            ]
        },
    ],
)
def test_conversation_ending_with_a_user_turn_is_a_problem(tmp_path, row):
    data = tmp_path / "trailing.jsonl"
    data.write_text(json.dumps(row) + "\n")
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result)
    assert f"{data}:1: last turn not the assistant's" in result.stdout


# -- 1. a datasets folder may only read files inside itself ---------------------------------------


def _arrow_stream(path: Path, texts: list[str]) -> None:
    import pyarrow as pa

    table = pa.table({"text": texts})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _datasets_folder(folder: Path, filename: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": filename}]}))
    return folder


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "dict split"])
def test_datasets_folder_naming_a_file_outside_it_is_refused(tmp_path, kind):
    import os

    secret = tmp_path / "secret" / "data-00000-of-00001.arrow"
    secret.parent.mkdir()
    _arrow_stream(secret, ["the server's secret row"])
    ds = tmp_path / "upload"
    if kind == "absolute":
        _datasets_folder(ds, str(secret))
    elif kind == "dotdot":
        _datasets_folder(ds, "../secret/data-00000-of-00001.arrow")
    elif kind == "symlink":
        _datasets_folder(ds, "data.arrow")
        os.symlink(secret, ds / "data.arrow")
    else:
        ds.mkdir()
        (ds / "dataset_dict.json").write_text(json.dumps({"splits": ["../secret"]}))
        (tmp_path / "secret" / "state.json").write_text(json.dumps({"_data_files": [{"filename": secret.name}]}))
    result = run_in_process("data", "validate", "--data", str(ds))
    assert_one_line_error(result, "outside", "refusing")
    assert "secret row" not in result.stdout + result.stderr


def test_datasets_folder_inside_itself_still_reads(tmp_path):
    ds = _datasets_folder(tmp_path / "ds", "data-00000-of-00001.arrow")
    _arrow_stream(ds / "data-00000-of-00001.arrow", ["hello there", "general kenobi"])
    result = run_in_process("data", "validate", "--data", str(ds))
    assert result.returncode == 0 and "2 valid rows, 0 invalid" in result.stdout, result.stderr


def test_damaged_tiny_preset_cache_says_how_to_rebuild_it(tiny_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_dir, home / "models" / tiny_dir.name)
    weights = home / "models" / tiny_dir.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("HYDRA_EDGE_HOME", str(home))
    result = run_in_process("finetune", "--out", str(tmp_path / "o"), "--max-steps", "1", "--heads", "2")
    assert_one_line_error(result, "--model tiny", "delete that folder")


@pytest.mark.parametrize(
    "content, needle",
    [(b"data: " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b"\xff\xfe\x00", "not UTF-8")],
)
def test_hostile_yaml_config_is_one_line(tmp_path, content, needle):
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    assert_one_line_error(run_in_process("finetune", "--config", str(config)), str(config), needle)


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "..", "a/b", "a\\b"])
def test_run_name_that_is_a_path_is_refused(tmp_path, name):
    result = run_in_process(
        "finetune", "--out", str(tmp_path / "run"), "--report-to", "tensorboard", "--run-name", name, "--max-steps", "1"
    )
    assert_one_line_error(result, "--run-name", "not a path")
    assert not (tmp_path / "run" / "runs").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "rel, content",
    [
        ("models/base/tokenizer.json", b'{"version": "1.0", "model": null}'),
        ("models/base/tokenizer_config.json", b"[1, 2]"),
        ("adapters/cluster_0.onnx_adapter", b"not a lora parameter file"),
        ("models/base/genai_config.json", b'{"model": {"decoder": []}}'),
    ],
)
def test_export_files_damaged_before_signing_are_one_line_naming_them(adapter_export, tmp_path, rel, content):
    from damage import resigned_copy

    folder = resigned_copy(adapter_export, tmp_path / "export", rel, content)
    result = run_in_process("chat", "--onnx", str(folder), "--prompt", "Capital of Peru?", "--max-new-tokens", "2")
    assert_one_line_error(result, "the export is damaged", str(Path(rel).parent if "models" in rel else rel))
