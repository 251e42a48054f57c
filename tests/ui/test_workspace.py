"""The UI's path safety: typed paths, new folder and upload names, and data sources all stay
inside the workspace (no server).

Turning form values into a CLI command is in test_workspace_commands.py, crafted run folders and
adapters in test_workspace_crafted.py, the metrics reader in test_metrics_reader.py."""

from __future__ import annotations

import json

import pytest
from workspacehelpers import workspace_with_links

from hydra_edge.errors import UserError
from hydra_edge.ui.datasets import _safe_file_name
from hydra_edge.ui.training import TrainSettings, build_command


@pytest.fixture
def ws(tmp_path):
    return workspace_with_links(tmp_path)


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("data/train.jsonl", "data/train.jsonl"),
        ("./data/train.jsonl", "data/train.jsonl"),
        ("data//train.jsonl", "data/train.jsonl"),
        ("  data/train.jsonl  ", "data/train.jsonl"),
        ("data/alias.jsonl", "data/train.jsonl"),  # a symlink inside the workspace is fine
        ("runs/r1", "runs/r1"),
        ("{root}/data/train.jsonl", "data/train.jsonl"),  # absolute, inside
    ],
)
def test_paths_inside_the_workspace_resolve(ws, typed, expected):
    assert ws.rel(ws.resolve(typed.format(root=ws.root))) == expected


@pytest.mark.parametrize(
    "typed, reason",
    [
        ("../outside/secret.jsonl", "'..' is not allowed"),
        ("data/../../outside/secret.jsonl", "'..' is not allowed"),
        ("data/../data/train.jsonl", "'..' is not allowed"),  # refused even when it would stay inside
        ("..\\outside\\secret.jsonl", "'..' is not allowed"),
        ("/etc/passwd", "outside the workspace"),
        ("{outside}/secret.jsonl", "outside the workspace"),
        ("{root}-sibling/x.jsonl", "outside the workspace"),  # a prefix of the root is not inside it
        ("data/escape/secret.jsonl", "leads outside the workspace"),
        ("~/secret.jsonl", "'~' is not allowed"),
        ("", "empty"),
        ("   ", "empty"),
        ("data/nothing.jsonl", "not found"),
        ("data/x\x00.jsonl", "invalid characters"),
    ],
)
def test_paths_leaving_the_workspace_are_refused(ws, typed, reason):
    typed = typed.format(root=ws.root, outside=ws.root.parent / "outside")
    with pytest.raises(UserError, match=reason):
        ws.resolve(typed, "data")


def test_kind_checks(ws):
    with pytest.raises(UserError, match="not a file"):
        ws.resolve("runs/r1", "data", kind="file")
    with pytest.raises(UserError, match="not a folder"):
        ws.resolve("data/train.jsonl", "adapter", kind="dir")
    assert not ws.resolve("runs/new", "run", must_exist=False).exists()


@pytest.mark.parametrize(
    "name, ok",
    [
        ("run-1", True),
        ("my_run.v2", True),
        ("A", True),
        ("", False),
        ("../x", False),
        ("a/b", False),
        (".hidden", False),
        ("-x", False),
        ("x" * 65, False),
        ("with space", False),
    ],
)
def test_new_folder_names(ws, name, ok):
    if ok:
        assert ws.new_folder("runs", name, "run name") == ws.root / "runs" / name
    else:
        with pytest.raises(UserError):
            ws.new_folder("runs", name, "run name")


@pytest.mark.parametrize(
    "uploaded, stored",
    [
        ("train.jsonl", "train.jsonl"),
        ("My Data (1).JSONL", "My_Data_1.jsonl"),
        ("../../etc/passwd.json", "passwd.json"),
        ("..\\..\\x.csv", "x.csv"),
        ("ünïcode.parquet", "n_code.parquet"),
        (".jsonl", "upload.jsonl"),
    ],
)
def test_upload_names_are_made_safe(uploaded, stored):
    assert _safe_file_name(uploaded) == stored


def test_demo_data_is_copied_into_a_new_workspace(ws):
    assert "data/demo/train.jsonl" in ws.data_files()
    assert "data/demo/eval.jsonl" in ws.data_files()
    assert "data/train.jsonl" in ws.data_files()


def _outside_arrow_file(ws) -> str:
    import pyarrow as pa

    secret = ws.root.parent / "secret.arrow"
    table = pa.table({"text": ["a row of a file outside the workspace"]})
    with pa.OSFile(str(secret), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return str(secret)


def test_ui_data_must_be_a_data_file_or_datasets_folder_under_data(ws):
    from hydra_edge.ui.datasets import find_clusters, validate_data

    # The attack: an uploaded state.json in data/ itself, naming an Arrow file elsewhere on the server.
    (ws.root / "data" / "state.json").write_text(json.dumps({"_data_files": [{"filename": _outside_arrow_file(ws)}]}))
    for call in (lambda d: validate_data(ws, d), lambda d: find_clusters(ws, d)):
        for typed in ("data", ".", "runs/r1", "data/"):
            with pytest.raises(UserError, match="data file or datasets folder"):
                call(typed)
    assert ws.rel(ws.data_source("data/train.jsonl")) == "data/train.jsonl"


def test_ui_datasets_folder_naming_an_outside_file_is_refused(ws):
    from hydra_edge.ui.datasets import validate_data

    folder = ws.root / "data" / "uploaded"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": _outside_arrow_file(ws)}]}))
    assert "data/uploaded" in ws.data_files()
    with pytest.raises(UserError, match="outside"):
        validate_data(ws, "data/uploaded")
    settings = TrainSettings(data="data/uploaded", eval_data="")
    _, _, config = build_command(ws, settings, "r2")  # the command is built; the run itself refuses the folder
    assert config.data == ["data/uploaded"]
    with pytest.raises(UserError, match="data file or datasets folder"):
        build_command(ws, TrainSettings(data="runs/r1", eval_data=""), "r3")


def test_exports_of_one_format_are_listed_by_their_manifest(ws):
    import json

    for name, manifest in (("a", {"format": "onnx"}), ("b", {"format": "peft"}), ("old", {"mode": "adapters"})):
        folder = ws.root / "exports" / name
        folder.mkdir(parents=True)
        (folder / "export_manifest.json").write_text(json.dumps(manifest))
    assert sorted(ws.exports()) == ["exports/a", "exports/b", "exports/old"]
    assert sorted(ws.exports("onnx")) == ["exports/a", "exports/old"]  # a manifest without a format is ONNX
