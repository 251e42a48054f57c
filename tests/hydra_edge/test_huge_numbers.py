"""Numbers too long to read: an integer past Python's digit limit (4,300 digits) in any JSON a
user supplies, and a setting past 64 bits in a YAML config, are named at their file and line,
never a `ValueError: Exceeds the limit (4300 digits)` traceback (files.parse_json, parse_yaml)."""

from __future__ import annotations

import csv
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.errors import UserError
from hydra_edge.files import parse_json, parse_yaml, read_json_object

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
HUGE = "9" * 5000  # digits: past Python's 4,300
TOO_LONG = "a number with 5,000 digits, more than the 4,300 Python reads; quote it as a string or shorten it"


def huge_number_file(folder, kind: str):
    """A data file whose second row holds a 5,000-digit integer (a CSV: inside a JSON cell)."""
    row = '{"messages": [{"role": "user", "content": ' + HUGE + '}, {"role": "assistant", "content": "x"}]}'
    if kind == "jsonl":
        path = folder / "huge.jsonl"
        path.write_text(json.dumps(GOOD) + "\n" + row + "\n" + json.dumps(GOOD) + "\n")
    elif kind == "json":
        path = folder / "huge.json"
        path.write_text("[\n" + json.dumps(GOOD) + ",\n" + row + ",\n" + json.dumps(GOOD) + "\n]\n")
    else:
        path = folder / "huge.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["messages"])
            turns = row[len('{"messages": ') : -1]
            writer.writerows([[json.dumps(GOOD["messages"])], [turns], [json.dumps(GOOD["messages"])]])
    return path


@pytest.mark.parametrize(
    "kind, where", [("jsonl", ":2"), ("json", ":3"), ("csv", ":row 2")], ids=["jsonl", "json", "csv"]
)
def test_an_integer_too_long_is_a_row_problem_in_every_text_format(tmp_path, kind, where):
    data = huge_number_file(tmp_path, kind)
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, "1 invalid row")
    column = "column 'messages': " if kind == "csv" else ""
    assert f"{data}{where}: malformed JSON ({column}{TOO_LONG})" in result.stdout
    assert ("0" if kind == "json" else "2") + " valid rows, 1 invalid" in result.stdout


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_json_text_in_a_parquet_or_arrow_cell_is_not_parsed(tmp_path, kind):
    """Parquet and Arrow hold lists as lists: a messages cell that is JSON text is a wrong type
    (never parsed, so its numbers cannot overflow anything)."""
    table = pa.table({"messages": ['[{"role": "user", "content": ' + HUGE + "}]"]})
    if kind == "parquet":
        data = tmp_path / "text.parquet"
        pq.write_table(table, data)
    else:
        data = tmp_path / "text-ds"
        data.mkdir()
        with pa.OSFile(str(data / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (data / "state.json").write_text(json.dumps({"_data_files": [{"filename": "d.arrow"}]}))
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, "1 invalid row")
    assert f"{data}:row 1: wrong type ('messages' must be a list, got str)" in result.stdout


@pytest.mark.parametrize(
    "arguments, detail",
    [
        ('{"n": ' + HUGE + "}", f"holds {TOO_LONG}"),
        ("[" * 100_000 + "]" * 100_000, "is nested too deeply"),
    ],
    ids=["huge number", "deep"],
)
def test_tool_call_arguments_too_long_or_deep_are_a_row_problem(tmp_path, arguments, detail):
    call = {"function": {"name": "f", "arguments": arguments}}
    row = {
        "messages": [
            {"role": "user", "content": "Call f"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "1"},
            {"role": "assistant", "content": "Done"},
        ]
    }
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps(GOOD) + "\n")
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, "1 invalid row")
    assert f"{data}:1: bad tool call (messages[1].tool_calls[0].function.arguments {detail})" in result.stdout


def test_json_files_read_whole_name_a_number_too_long(tmp_path):
    """read_json_object (adapter configs, run_config.json, ...) and a datasets folder's
    state.json say what is wrong, not "use sys.set_int_max_str_digits()"."""
    config = tmp_path / "adapter_config.json"
    config.write_text('{"rank": ' + HUGE + "}")
    with pytest.raises(UserError, match=f"{config}: not valid JSON \\({TOO_LONG}\\); retrain"):
        read_json_object(config, "retrain")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text('{"_data_files": [], "_fingerprint": ' + HUGE + "}")
    result = run_in_process("data", "validate", "--data", str(folder))
    assert_one_line_error(result, f"{folder / 'state.json'}: not a readable state.json ({TOO_LONG})")


@pytest.mark.parametrize(
    "value",
    [
        HUGE,  # decimal: past Python's digit limit
        "1" + "0" * 400,  # under it, but float() of it overflows (lr) and no setting is this large
        "0x" + "f" * 40,  # hex and binary build any size of integer without a digit limit
        "-0b" + "1" * 4000,
        "1:" * 2000 + "1",  # YAML 1.1's 60-based integers, multiplied out by PyYAML
        str(2**63),  # one past what torch.manual_seed takes
    ],
    ids=["5000 digits", "401 digits", "hex", "binary", "sexagesimal", "2**63"],
)
def test_a_yaml_number_too_long_for_a_setting_is_one_line(tmp_path, value):
    config = tmp_path / "run.yaml"
    config.write_text(f"heads: '1'\nseed: {value}\n")
    result = run_in_process("finetune", "--config", str(config), "--out", str(tmp_path / "o"))
    assert_one_line_error(
        result, f"{config}:2: invalid YAML (the number ", "is too long: a setting takes whole numbers"
    )


def test_the_number_limits_and_out_of_range_floats(tmp_path):
    """The edges: 4,300 digits read in JSON and 64-bit settings in YAML; a float out of range
    reads as inf in both (json's own behaviour), and in a data row it is a wrong type."""
    assert parse_json("9" * 4300) == int("9" * 4300)
    assert parse_yaml(f"seed: {2**63 - 1}\nmax_steps: {-(2**63)}\nlr: 1_0") == {
        "seed": 2**63 - 1,
        "max_steps": -(2**63),
        "lr": 10,
    }
    with pytest.raises(yaml.YAMLError):
        parse_yaml(f"seed: {-(2**63) - 1}")
    assert parse_json("[1e999, -1e999]") == [math.inf, -math.inf]
    assert parse_yaml("lr: 1.0e+999") == {"lr": math.inf}
    data = tmp_path / "inf.jsonl"
    data.write_text('{"text": 1e999}\n')
    result = run_in_process("data", "validate", "--data", str(data))
    assert f"{data}:1: wrong type ('text' must be a string, got float)" in result.stdout


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2**32)])
def test_a_seed_out_of_range_is_one_line(tmp_path, seed):
    result = run_in_process("finetune", "--seed", seed, "--out", str(tmp_path / "run"), "--max-steps", "1")
    assert_one_line_error(result, "--seed")


@pytest.mark.parametrize("change", [{"lr": 10**400}, {"seed": 2**70}, {"rank": -(10**30)}])
def test_a_run_config_with_numbers_too_long_is_one_line_on_resume(tmp_path, change):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"model": "tiny", **change}))
    result = run_in_process("finetune", "--out", str(run), "--resume")
    assert_one_line_error(result, "run_config.json", "too long")
