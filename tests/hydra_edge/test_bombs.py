"""Parquet and Arrow files that decode to far more than they hold: a dictionary naming one 10 MB
string in every row, runs of nulls, cells too long. Each is measured before its rows become
Python objects (sources._arrow_batches): a cell over the limit is a row problem, a file that
decodes past its limit is refused in one line, and memory stays small either way."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.data import sources
from hydra_edge.data.records import load_records

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
BIG = 10_000_000  # characters in the bomb's one string


def repeated_string_table(rows: int, size: int = BIG, column: str = "text") -> pa.Table:
    """`rows` rows naming one `size`-character string through a dictionary: `size` bytes in
    memory here, rows x size once decoded."""
    return pa.table({column: pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["x" * size]))})


def parquet_bomb(path: Path, rows: int = 1000, size: int = BIG, arrow_schema: bool = True) -> Path:
    """The 1 KB Parquet file of the hardening issue: zstd, dictionary-encoded. Without the stored
    Arrow schema (as polars, DuckDB or Spark write it) the column reads back as plain strings."""
    pq.write_table(repeated_string_table(rows, size), path, compression="zstd", store_schema=arrow_schema)
    return path


def arrow_folder(folder: Path, table: pa.Table, compression: str | None = None) -> Path:
    """A save_to_disk folder (state.json and one Arrow stream file) holding `table`."""
    folder.mkdir()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema, options=options) as writer,
    ):
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return folder


def arrow_bomb(folder: Path, rows: int = 1000, size: int = BIG) -> Path:
    """The same bomb as a datasets folder: a zstd-compressed Arrow stream, under 1 KB."""
    return arrow_folder(folder, repeated_string_table(rows, size), compression="zstd")


# Runs a command and prints its peak RSS: the child is forked from this small process, as Linux
# starts a child's peak at its parent's size (the test process, bombs built, is far larger).
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr); sys.exit(code)"
)


def validate_measuring_memory(data: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in MB) of `python -m hydra_edge data validate --data
    DATA`, run from a fresh small process that reports its one child's peak (PEAK_RSS)."""
    validate = [sys.executable, "-m", "hydra_edge", "data", "validate", "--data", str(data)]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *validate], capture_output=True, text=True, timeout=600)
    stderr, _, peak = done.stderr.rstrip("\n").rpartition("\n")
    return done.returncode, done.stdout, stderr + "\n", int(peak)


@pytest.mark.parametrize("kind", ["parquet", "parquet without Arrow schema", "datasets"])
def test_decompression_bomb_is_refused_in_bounded_memory(tmp_path, kind):
    """The issue's 1 KB file: 1,000 rows of one 10 MB string, 10 GB once decoded (before: a
    MemoryError traceback, and 1.2 GB of memory at 100 rows). Refused in one line, the file
    named, and the process stays under 300 MB."""
    if kind == "datasets":
        data = arrow_bomb(tmp_path / "bomb-ds")
        assert (data / "data-00000-of-00001.arrow").stat().st_size < 2048
    else:
        data = parquet_bomb(tmp_path / "bomb.parquet", arrow_schema=kind == "parquet")
        assert data.stat().st_size < 2048
    code, stdout, stderr, peak_mb = validate_measuring_memory(data)
    assert_one_line_error(subprocess.CompletedProcess([], code, stdout, stderr), str(data), "decode to more than")
    assert "1,073,741,824 bytes" in stderr and "read up to row 1,000" in stderr
    assert peak_mb < 300, f"peak RSS {peak_mb} MB"


def test_bomb_under_the_file_limit_is_a_row_problem_per_row_in_bounded_memory(tmp_path):
    """100 rows of the 10 MB string (1 GB decoded, under the file's limit): every row is named as
    a cell too long, none is decoded."""
    data = parquet_bomb(tmp_path / "bomb100.parquet", rows=100)
    code, stdout, stderr, peak_mb = validate_measuring_memory(data)
    assert_one_line_error(subprocess.CompletedProcess([], code, stdout, stderr), "100 invalid rows")
    assert (
        f"{data}:row 1: cell too long (column 'text' holds 10,000,000 characters once decoded, more than the "
        "131,072 a cell may hold; put long texts in a .jsonl file)"
    ) in stdout
    assert "0 valid rows, 100 invalid (cell too long: 100)" in stdout
    assert peak_mb < 300, f"peak RSS {peak_mb} MB"


def _cells(size_of_row_2: int) -> list[dict]:
    return [{"text": "short"}, {"text": "y" * size_of_row_2}, {"text": "also short"}]


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_a_cell_over_the_csv_limit_is_a_row_problem_in_every_format(tmp_path, kind):
    """One limit for a cell in CSV, Parquet and Arrow (MAX_CELL_CHARS, the csv module's): 131,072
    characters pass, one more is the row's problem and the other rows still load."""
    for size, problems in ((sources.MAX_CELL_CHARS, 0), (sources.MAX_CELL_CHARS + 1, 1)):
        table = pa.Table.from_pylist(_cells(size))
        if kind == "parquet":
            data = tmp_path / f"cells{size}.parquet"
            pq.write_table(table, data)
        else:
            data = arrow_folder(tmp_path / f"cells{size}-ds", table)
        loaded = load_records([str(data)], skip_invalid=True)
        assert len(loaded.problems) == problems and len(loaded.records) == 3 - problems
        if problems:
            assert str(loaded.problems[0]) == (
                f"{data}:row 2: cell too long (column 'text' holds 131,073 characters once decoded, more than the "
                "131,072 a cell may hold; put long texts in a .jsonl file)"
            )
            assert [r.source for r in loaded.records] == [f"{data}:row 1", f"{data}:row 3"]


def test_csv_cells_keep_the_same_limit_whoever_changed_the_csv_module(tmp_path):
    data = tmp_path / "big.csv"
    data.write_text('text\nshort\n"' + "x" * (sources.MAX_CELL_CHARS + 1) + '"\n')
    previous = csv.field_size_limit(10 * sources.MAX_CELL_CHARS)
    try:
        loaded = load_records([str(data)], skip_invalid=True)
    finally:
        csv.field_size_limit(previous)
    assert [str(p) for p in loaded.problems] == [
        f"{data}:row 2: malformed CSV (a cell is longer than 131,072 characters; put long texts in a .jsonl file)"
    ]


def test_cells_are_measured_through_lists_structs_and_dictionaries(tmp_path):
    """A messages column (a list of structs) is one cell: its turns' texts add up, a turn repeated
    through a dictionary counts at each use, and text counts in characters, not UTF-8 bytes."""
    turn = "é" * 40_000  # 40,000 characters, 80,000 bytes

    def conversation(answer: str) -> dict:
        return {"messages": [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]}

    rows = [conversation(turn), conversation(turn + "é" * 60_000), {"messages": None}, GOOD]
    data = tmp_path / "turns.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    loaded = load_records([str(data)], skip_invalid=True)
    reasons = [str(p).split(" (")[0] for p in loaded.problems]
    assert reasons == [f"{data}:row 2: cell too long", f"{data}:row 3: wrong type"]
    assert "column 'messages' holds 140,015 characters" in str(loaded.problems[0])  # 4 + 40,000 + 9 + 100,000 + 2 turns
    assert [r.source for r in loaded.records] == [f"{data}:row 1", f"{data}:row 4"]
    assert loaded.records[0].messages[1]["content"] == turn  # 80,015 characters (160,015 bytes): loads


def test_parquet_declaring_more_than_its_limit_is_refused_before_reading(tmp_path):
    """Three million null rows take 7 KB on disk and a few GB as Python objects; the metadata
    (rows, uncompressed sizes) is enough to refuse the file before a page is read."""
    data = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": pa.nulls(3_000_000, pa.string())}), data, compression="zstd")
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, str(data), "decode to more than 1,073,741,824 bytes (by its metadata)")


def test_the_decoded_limit_grows_with_the_file_and_counts_rows_as_they_are_read(tmp_path, monkeypatch):
    """Metadata understates a dictionary (its one value counts once there), so the rows read so
    far count too, row group after row group: text plus ROW_COST a row, against the larger of
    MAX_DECODED_BYTES and DECODED_PER_FILE_BYTE times the file's size."""
    assert sources.decoded_limit(1000) == 1 << 30
    assert sources.decoded_limit(1 << 30) == 32 << 30
    monkeypatch.setattr(sources, "MAX_DECODED_BYTES", 2_000_000)
    data = tmp_path / "many.parquet"  # 3 row groups of 1,000 rows: 1 MB of text and 0.5 MB of rows each
    pq.write_table(repeated_string_table(3000, 1000), data, row_group_size=1000)
    assert pq.read_metadata(data).row_group(0).total_byte_size < 100_000
    result = run_in_process("data", "validate", "--data", str(data))
    assert_one_line_error(result, str(data), "more than 2,000,000 bytes (read up to row 2,000)")
    monkeypatch.setattr(sources, "MAX_DECODED_BYTES", 5_000_000)
    assert "3000 valid rows" in run_in_process("data", "validate", "--data", str(data)).stdout


def test_damaged_dictionary_indices_are_one_line(tmp_path):
    """An Arrow stream whose dictionary indices point past the dictionary (a bit flip, or a
    crafted file): reported as damage, never an IndexError."""
    table = pa.table({"text": pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["a", "b"]))})
    folder = arrow_folder(tmp_path / "bad-ds", table)
    stream = folder / "data-00000-of-00001.arrow"
    raw = bytearray(stream.read_bytes())
    indices = raw.rfind(bytes([1, 0, 0, 0]))  # the second row's index, the last int32 1 in the file
    raw[indices] = 7
    stream.write_bytes(bytes(raw))
    result = run_in_process("data", "validate", "--data", str(folder))
    assert_one_line_error(result, str(folder), "damaged")
