"""Damaged and crafted files a user may be handed: adapters, cluster routers, run configs, export
manifests and exports, the tiny preset's cache. Each ends in one `hydra-edge: error:` line and
exit code 2, never a traceback, and is refused before anything is allocated or written.

Full and read-only disks are in test_hardening_disk.py; hostile data, YAML and names in
test_hardening_inputs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, run_in_process
from hardening_helpers import truncate
from safetensors.torch import load_file, save_file

from hydra_edge.models.tiny import DEMO_EVAL


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


CLUSTER_DAMAGE = {
    "empty clusters.json": ("clusters.json", lambda p: p.write_text("")),
    "garbled clusters.json": ("clusters.json", lambda p: p.write_text('{"k": 3, "vocabulary": [1, 2')),
    "clusters.json without vocabulary": ("clusters.json", lambda p: p.write_text('{"k": 3}')),
    "truncated clusters.safetensors": ("clusters.safetensors", truncate),
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


def test_damaged_tiny_preset_cache_says_how_to_rebuild_it(tiny_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_dir, home / "models" / tiny_dir.name)
    weights = home / "models" / tiny_dir.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("HYDRA_EDGE_HOME", str(home))
    result = run_in_process("finetune", "--out", str(tmp_path / "o"), "--max-steps", "1", "--heads", "2")
    assert_one_line_error(result, "--model tiny", "delete that folder")


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
