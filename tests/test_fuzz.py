"""Fuzzing every file hydra-edge reads: damaged adapter folders, checkpoints and exports, and
hostile data rows in every format, through finetune, --resume, eval, chat, export and data
validate. Every case must end with exit code 0 or 2, and a 2 with exactly one
`hydra-edge: error:` line as the last line; never a traceback. Runs in-process (no interpreter
start per case); the cases are generated from a fixed seed, so a failure reproduces."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import traceback
from pathlib import Path

import pytest
from cli_helpers import run_in_process
from damage import DEEP, SEED, damaged_versions, resigned_copy, spoiled_copy

# Damage that leaves no valid file (export would otherwise run a full build for a mutation that
# happens to be harmless, such as a flipped bit inside a chat template string).
STRUCTURAL = (
    "empty",
    "one byte",
    "half",
    "last 7 bytes cut",
    "garbage",
    "array",
    "string",
    "null",
    "deep",
    "invalid UTF-8",
    "wrong types",
)


class Outcomes:
    """Runs cases and keeps every one that broke the guarantee, reported together at the end."""

    def __init__(self) -> None:
        self.count, self.codes, self.failures = 0, {0: 0, 2: 0}, []

    def run(self, case: str, *args: str) -> None:
        self.count += 1
        try:
            result = run_in_process(*args)
        except BaseException:  # noqa: BLE001 - what escaped main() is exactly what this test looks for
            self.failures.append(f"{case}: {' '.join(args[:2])}: escaped main():\n{traceback.format_exc(limit=-3)}")
            return
        errors = [line for line in result.stderr.splitlines() if line.startswith("hydra-edge: error:")]
        ok = (
            "Traceback" not in result.stderr
            and result.returncode in (0, 2)
            and (result.returncode == 0 or (len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])))
        )
        if not ok:
            self.failures.append(f"{case}: {' '.join(args[:2])}: exit {result.returncode}: {result.stderr[-600:]}")
        else:
            self.codes[result.returncode] += 1

    def check(self, at_least: int) -> None:
        print(f"fuzz: {self.count} cases, {self.codes[0]} exit 0, {self.codes[2]} exit 2, {len(self.failures)} broken")
        if os.environ.get("FUZZ_FAILURES"):  # every failure, not only the first ten, for debugging
            Path(os.environ["FUZZ_FAILURES"]).write_text("\n\n".join(self.failures))
        assert not self.failures, "\n\n".join(self.failures[:10])
        assert self.count >= at_least


ADAPTER_FILES = {  # file -> the commands that read it
    "adapter_config.json": ("eval", "chat", "export"),
    "adapter_model.safetensors": ("eval", "chat", "export"),
    "clusters.json": ("eval", "chat", "export"),
    "clusters.safetensors": ("eval", "chat", "export"),
    "cluster_gates.safetensors": ("export",),
    "run_config.json": ("export",),
}


def test_fuzz_adapter_folder(trained_adapter, small_eval, tmp_path):
    outcomes = Outcomes()
    for rel, commands in ADAPTER_FILES.items():
        original = (trained_adapter / rel).read_bytes()
        for label, content in damaged_versions(original, rel.endswith(".json"), rel).items():
            folder = spoiled_copy(trained_adapter, tmp_path / "adapter", rel, content)
            case = f"adapter {rel} ({label})"
            for command in commands:
                if command == "export":
                    if label in STRUCTURAL:
                        shutil.rmtree(tmp_path / "export", ignore_errors=True)
                        outcomes.run(case, "export", "--adapter", str(folder), "--out", str(tmp_path / "export"))
                elif command == "eval":
                    outcomes.run(
                        case, "eval", "--adapter", str(folder), "--data", str(small_eval), "--max-new-tokens", "2"
                    )
                else:
                    outcomes.run(
                        case, "chat", "--adapter", str(folder), "--prompt", "Capital of Peru?", "--max-new-tokens", "2"
                    )
    outcomes.check(at_least=120)


CHECKPOINT_FILES = [
    "checkpoints/step-000004/trainer_state.json",
    "checkpoints/step-000004/optimizer.safetensors",
    "checkpoints/step-000004/rng.safetensors",
    "checkpoints/step-000004/adapter_model.safetensors",
    "run_config.json",
    "clusters.json",
]


def test_fuzz_checkpoint_and_resume(checkpointed_run, tmp_path):
    outcomes = Outcomes()
    for rel in CHECKPOINT_FILES:
        original = (checkpointed_run / rel).read_bytes()
        versions = damaged_versions(original, rel.endswith(".json"), rel)
        for label in ("empty", "half", "garbage", "bit flip (middle", "wrong types", "deep", "array"):
            for name, content in versions.items():
                if name.startswith(label):
                    folder = spoiled_copy(checkpointed_run, tmp_path / "run", rel, content)
                    outcomes.run(f"run {rel} ({name})", "finetune", "--out", str(folder), "--resume")
    outcomes.check(at_least=30)


EXPORT_FILES = [
    "export_manifest.json",
    "router/clusters.json",
    "router/clusters.safetensors",
    "models/base/genai_config.json",
    "models/base/model.onnx",
    "models/base/tokenizer.json",
    "adapters/cluster_0.onnx_adapter",
]


def test_fuzz_export_folder(adapter_export, small_eval, tmp_path):
    outcomes = Outcomes()
    for rel in EXPORT_FILES:
        original = (adapter_export / rel).read_bytes()
        for label, content in damaged_versions(original, rel.endswith(".json"), rel).items():
            folder = spoiled_copy(adapter_export, tmp_path / "export", rel, content)
            case = f"export {rel} ({label})"
            outcomes.run(case, "chat", "--onnx", str(folder), "--prompt", "Capital of Peru?", "--max-new-tokens", "2")
            outcomes.run(case, "eval", "--onnx", str(folder), "--data", str(small_eval), "--max-new-tokens", "2")
    outcomes.check(at_least=100)


@pytest.fixture(scope="module", params=["adapters", "merged", "dynamic"])
def any_export(request, trained_adapter, adapter_export, tmp_path_factory) -> Path:
    """An fp32 export of trained_adapter in each mode."""
    from hydra_edge.exporters.formats.onnx import export

    if request.param == "adapters":
        return adapter_export
    out = tmp_path_factory.mktemp(f"{request.param}-export") / "onnx"
    export(trained_adapter, out, mode=request.param, log=lambda m: None)
    return out


def test_fuzz_every_export_file_behind_a_matching_manifest(any_export, small_eval, tmp_path):
    outcomes = Outcomes()
    manifest = json.loads((any_export / "export_manifest.json").read_text())
    # every file chat and eval read (peft/ and serve-vllm.sh are vLLM's, which hydra-edge never opens)
    for rel in sorted(f for f in manifest["files"] if f.split("/")[0] in ("models", "adapters", "router")):
        original = (any_export / rel).read_bytes()
        for label, content in damaged_versions(original, rel.endswith(".json"), rel).items():
            folder = resigned_copy(any_export, tmp_path / "export", rel, content)
            case = f"export {any_export.parent.name} {rel} ({label}, manifest updated)"
            outcomes.run(case, "chat", "--onnx", str(folder), "--prompt", "Capital of Peru?", "--max-new-tokens", "2")
            if label in STRUCTURAL:
                outcomes.run(case, "eval", "--onnx", str(folder), "--data", str(small_eval), "--max-new-tokens", "2")
    outcomes.check(at_least=60)


HOSTILE_ROWS = [
    None,
    7,
    "a string",
    [],
    {},
    {"messages": None},
    {"messages": "hello"},
    {"messages": [1, 2]},
    {"messages": [{"role": 1, "content": "x"}]},
    {"messages": [{"role": "user", "content": ["part"]}]},
    {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"},
        ]
    },
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
    {"conversations": {"from": "human", "value": "hi"}},
    {"conversations": [{"from": "cat", "value": "meow"}]},
    {"instruction": 1, "output": "x"},
    {"instruction": "do", "output": None},
    {"instruction": "", "output": "x"},
    {"prompt": None, "completion": "y"},
    {"prompt": "p", "completion": {"nested": True}},
    {"text": {"nested": 1}},
    {"text": ""},
    {"text": None},
    {"text": ["a", "b"]},
    {"unknown": "columns"},
    {"messages": [{"role": "user", "content": "q" * 5000}, {"role": "assistant", "content": 3.5}]},
]
GOOD_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _write_rows(folder: Path, stem: str, rows: list, fmt: str) -> Path:
    """The rows as one file of a format (or a datasets folder); values a format cannot hold as
    such are written as their JSON text, as a user's export script would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "jsonl":
        path = folder / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = folder / f"{stem}.json"
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "csv":
        import csv

        path = folder / f"{stem}.csv"
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r}) or ["text"]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in rows:
                r = r if isinstance(r, dict) else {"text": r}
                writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in (r.get(c) for c in columns)])
    else:
        records = [r if isinstance(r, dict) else {"value": r} for r in rows]
        as_text = [{k: v if isinstance(v, str) or v is None else json.dumps(v) for k, v in r.items()} for r in records]
        try:
            table = pa.Table.from_pylist(records)
        except (pa.ArrowException, TypeError, ValueError):
            table = pa.Table.from_pylist(as_text)
        if fmt == "parquet":
            path = folder / f"{stem}.parquet"
            pq.write_table(table, path)
        else:
            path = folder / f"{stem}-ds"
            path.mkdir()
            with (
                pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink,
                pa.ipc.new_stream(sink, table.schema) as w,
            ):
                w.write_table(table)
            (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return path


RAW_FILES = {
    "bad.jsonl": b'{"text": "ok"}\n\xff\xfe\x00\n{"text": "\\ud800 lone surrogate"}\n',
    "nul.jsonl": b'{"text": "a\x00b"}\n\x00\x00\x00\n',
    "bom.jsonl": b'\xef\xbb\xbf{"text": "a file saved with a byte order mark"}\n',
    "surrogate.jsonl": b'{"text": "a lone surrogate \\ud800 in valid JSON"}\n{"text": "fine"}\n',
    "odd-but-valid.jsonl": (
        '{"text": "emoji \\ud83d\\ude00, a bell \\u0007, a tab \\t and \u05e9\u05dc\u05d5\u05dd"}\r\n'
        '{"text": "CRLF line endings"}\r\n'
    ).encode(),
    "crlf.csv": b'prompt,completion\r\nHi,Hello\r\n"unterminated,x\r\n',
    "ragged.csv": b"prompt,completion\nHi,Hello,extra,cells\nonly-one\n",
    "header-only.csv": b"prompt,completion\n",
    "huge-cell.csv": b'prompt,completion\n"' + b"x" * 140_000 + b'",y\n',
    "deep.jsonl": b'{"messages": ' + DEEP + b"}\n",
    "deep.json": b"[" + DEEP + b"]",
    "not-array.json": b'{"text": "a single object"}',
    "whitespace.jsonl": b"   \n\n\t\n",
    "garbage.parquet": random.Random(SEED).randbytes(2000),
    "truncated.parquet": None,  # filled in from a real Parquet file below
}


HUGE_INT = b"9" * 5000  # past Python's 4,300-digit limit for reading an integer
RAW_FILES.update(
    {
        "huge-int.jsonl": b'{"text": "ok"}\n{"text": "x", "n": ' + HUGE_INT + b"}\n",
        "huge-int.json": b'[{"text": "ok"},\n{"text": "x", "n": ' + HUGE_INT + b"}]",
        "huge-int.csv": b'messages\n"[{""role"": ""user"", ""content"": ' + HUGE_INT + b'}]"\n',
        "huge-int-tool-arguments.jsonl": json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Call f"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "f", "arguments": '{"n": ' + "9" * 5000 + "}"}}],
                    },
                    {"role": "tool", "content": "1"},
                    {"role": "assistant", "content": "Done"},
                ]
            }
        ).encode()
        + b"\n",
        "huge-float.jsonl": b'{"text": "ok"}\n{"text": 1e999}\n',
        "bomb.jsonl.gz": gzip.compress(b'{"text": "' + b"x" * 10_000_000 + b'"}\n'),  # .gz is not read: refused
    }
)

# `finetune --config FILE`: numbers no setting can hold, in every YAML spelling of an integer
HOSTILE_CONFIGS = {
    "huge-int.yaml": b"seed: " + HUGE_INT + b"\n",
    "hex.yaml": b"seed: 0x" + b"f" * 40 + b"\n",
    "binary.yaml": b"seed: -0b" + b"1" * 4000 + b"\n",
    "sexagesimal.yaml": b"seed: " + b"1:" * 2000 + b"1\n",
    "int-past-float.yaml": b"lr: 1" + b"0" * 400 + b"\n",
    "seed-2-63.yaml": b"seed: 9223372036854775808\n",
    "huge-rank.yaml": b"rank: 1" + b"0" * 30 + b"\n",
}


def write_bombs(folder: Path) -> list[Path]:
    """Decompression bombs: each a few KB on disk, gigabytes once decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ten_mb = pa.array(["x" * 10_000_000])
    bomb = pa.table({"text": pa.DictionaryArray.from_arrays(pa.array([0] * 1000, pa.int32()), ten_mb)})
    pq.write_table(bomb, folder / "bomb.parquet", compression="zstd")
    pq.write_table(bomb, folder / "bomb-no-arrow-schema.parquet", compression="zstd", store_schema=False)
    nulls = pa.table({"text": pa.nulls(3_000_000, pa.string())})
    pq.write_table(nulls, folder / "null-rows.parquet", compression="zstd")
    refs = pa.DictionaryArray.from_arrays(pa.array([0] * 100_000, pa.int32()), pa.array(["y" * 1000]))
    nested = pa.ListArray.from_arrays(pa.array([0, 100_000], pa.int32()), refs)
    pq.write_table(pa.table({"text": nested}), folder / "nested-bomb.parquet", compression="zstd")
    ds = folder / "bomb-ds"
    ds.mkdir()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with (
        pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, bomb.schema, options=options) as writer,
    ):
        writer.write_table(bomb)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    names = ("bomb.parquet", "bomb-no-arrow-schema.parquet", "null-rows.parquet", "nested-bomb.parquet", "bomb-ds")
    return [folder / name for name in names]


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_fuzz_data_files(tmp_path):
    outcomes = Outcomes()
    folder = tmp_path / "data"
    folder.mkdir()
    files = []
    for i, row in enumerate(HOSTILE_ROWS):
        for fmt in ("jsonl", "json", "csv", "parquet", "datasets"):
            files.append(_write_rows(folder, f"row{i}-{fmt}", [GOOD_ROW, row], fmt))
    good_parquet = _write_rows(folder, "good", [GOOD_ROW] * 3, "parquet").read_bytes()
    for name, content in RAW_FILES.items():
        (folder / name).write_bytes(content if content is not None else good_parquet[: len(good_parquet) // 2])
        files.append(folder / name)
    broken_ds = folder / "broken-ds"
    broken_ds.mkdir()
    (broken_ds / "dataset_dict.json").write_text('{"splits": "train"}')
    files.append(broken_ds)
    files += write_bombs(folder)
    for name, content in HOSTILE_CONFIGS.items():
        (folder / name).write_bytes(content)
        outcomes.run(f"config {name}", "finetune", "--config", str(folder / name), "--out", str(tmp_path / "cfg"))
    for i, path in enumerate(files):
        outcomes.run(f"data {path.name}", "data", "validate", "--data", str(path))
        out = tmp_path / f"run{i}"
        outcomes.run(
            f"data {path.name}",
            "finetune",
            "--data",
            str(path),
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--heads",
            "1",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
        )
    outcomes.check(at_least=250)
