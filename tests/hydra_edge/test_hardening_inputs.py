"""Hostile inputs: data rows, datasets folders naming files outside themselves, YAML configs and
run names that are paths. Each is a FILE:LINE problem or one `hydra-edge: error:` line, never a
traceback, and nothing outside the given folders is read or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_in_process

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
