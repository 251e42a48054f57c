"""Reading rows out of data files, each with the place it came from.

Supported: `.jsonl`, `.json` (an array), `.csv`, `.parquet`, a folder written by Hugging Face
`datasets` (`save_to_disk`, a Dataset or a DatasetDict, whose `train` split is used), and
`hf:ORG/NAME[:SPLIT]`: a dataset `datasets.load_dataset` finds (the Hub or its cache, or a local
dataset folder of data files), rows numbered `hf:ORG/NAME:row N`. Every row
is yielded as `RawRow(location, value)`; a row that cannot even be decoded is yielded with a
`problem` instead, so validation can report every bad row, not just the first.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.files import path_inside

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LONE_SURROGATE = ("invalid text", "a \\uD800-\\uDFFF escape without its pair; it is not a character, remove it")
TOO_DEEP = "nested too deeply to read; a data row holds strings and lists of turns, not deep structures"
# CSV cells are strings; these columns hold lists and arrive JSON-encoded.
JSON_COLUMNS = ("messages", "conversations")


@dataclass
class RawRow:
    location: str  # "FILE:LINE" (text files) or "FILE:row N" (CSV/Parquet/datasets)
    value: object = None
    problem: tuple[str, str] | None = None  # (reason, detail) when the row could not be decoded


HUB_PREFIX = "hf:"


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Every row of one data file, datasets folder or hf: dataset, in order."""
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        yield from _hub_dataset(path)
        return
    path = Path(path)
    if path.is_dir():
        yield from _datasets_folder(path)
        return
    if not path.is_file():
        raise UserError(f"--data {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise UserError(
            f"--data {path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet "
            "or a folder saved by datasets.save_to_disk"
        )
    if path.stat().st_size == 0:
        yield RawRow(f"{path}:1", problem=("empty file", "the file has no rows"))
        return
    yield from {".jsonl": _jsonl, ".json": _json_array, ".csv": _csv, ".parquet": _parquet}[suffix](path)


def _jsonl(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a BOM (Windows editors write one)
    any_row = False
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        any_row = True
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(where, problem=("invalid UTF-8", f"byte {exc.start} of the line; re-save the file as UTF-8"))
            continue
        try:
            value = json.loads(line)
            bad = SURROGATE_ESCAPE.search(line) is not None and _has_lone_surrogate(value)
            yield RawRow(where, problem=LONE_SURROGATE) if bad else RawRow(where, value)
        except json.JSONDecodeError as exc:
            yield RawRow(where, problem=("malformed JSON", f"{exc.msg} at column {exc.colno}"))
        except RecursionError:
            yield RawRow(where, problem=("malformed JSON", TOO_DEEP))
    if not any_row:
        yield RawRow(f"{path}:1", problem=("empty file", "the file has no rows"))


def _has_lone_surrogate(value) -> bool:
    """Whether a decoded JSON value holds half of a UTF-16 surrogate pair (`"\\ud800"` alone),
    which no UTF-8 file can store: it would break every later write of the text. Callers first
    look for such an escape in the raw text (SURROGATE_ESCAPE), which keeps this off the common path."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _decode_whole(path: Path) -> tuple[str | None, RawRow | None]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return None, RawRow(f"{path}:{line}", problem=("invalid UTF-8", "re-save the file as UTF-8"))


def _json_array(path: Path) -> Iterator[RawRow]:
    text, bad = _decode_whole(path)
    if bad:
        yield bad
        return
    if not text.strip():
        yield RawRow(f"{path}:1", problem=("empty file", "the file has no rows"))
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        yield RawRow(f"{path}:{exc.lineno}", problem=("malformed JSON", f"{exc.msg} at column {exc.colno}"))
        return
    except RecursionError:
        yield RawRow(f"{path}:{_deepest_line(text)}", problem=("malformed JSON", TOO_DEEP))
        return
    if not isinstance(rows, list):
        yield RawRow(f"{path}:1", problem=("wrong type", "a .json data file must hold an array of rows"))
        return
    if not rows:
        yield RawRow(f"{path}:1", problem=("empty file", "the array has no rows"))
    escapes = SURROGATE_ESCAPE.search(text) is not None
    for i, row in enumerate(rows, start=1):
        bad = escapes and _has_lone_surrogate(row)
        yield RawRow(f"{path}:row {i}", problem=LONE_SURROGATE) if bad else RawRow(f"{path}:row {i}", row)


def _deepest_line(text: str) -> int:
    """The line where a JSON text's nesting is deepest (json gives no position for a
    RecursionError). A plain scan: brackets inside strings do not count."""
    depth = deepest = 0
    line = deepest_line = 1
    in_string = escaped = False
    for char in text:
        if char == "\n":
            line += 1
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif char in "]}":
            depth -= 1
    return deepest_line


def _csv_rows(reader) -> Iterator[dict | csv.Error]:
    """The reader's rows; a row the csv module refuses (a cell over its field size limit) comes
    out as its csv.Error, and reading goes on with the next row."""
    rows = iter(reader)
    while True:
        try:
            yield next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            yield exc


def _csv(path: Path) -> Iterator[RawRow]:
    text, bad = _decode_whole(path)
    if bad:
        yield bad
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    any_row = False
    for i, row in enumerate(_csv_rows(reader), start=1):
        any_row = True
        where = f"{path}:row {i}"
        if isinstance(row, csv.Error):
            too_long = f"a cell is longer than {csv.field_size_limit():,} characters; put long texts in a .jsonl file"
            yield RawRow(where, problem=("malformed CSV", too_long if "field limit" in str(row) else str(row)))
            continue
        if None in row:
            yield RawRow(where, problem=("malformed CSV", "more cells than header columns"))
            continue
        decoded, problem = {}, None
        for key, value in row.items():
            if key in JSON_COLUMNS and value is not None and value.strip():
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    problem = ("malformed JSON", f"column '{key}': {exc.msg}")
                    break
                except RecursionError:
                    problem = ("malformed JSON", f"column '{key}': {TOO_DEEP}")
                    break
            decoded[key] = value if value != "" else None
        yield RawRow(where, problem=problem) if problem else RawRow(where, decoded)
    if not any_row:
        yield RawRow(f"{path}:1", problem=("empty file", "no rows below the header"))


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as exc:  # ArrowInvalid and friends for damaged files
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from exc
    yield from _arrow_batches(path, table.iter_batches(batch_size=4096), table.metadata.num_rows)


def _read_json_file(path: Path, what: str):
    """A small JSON file written by a library (datasets' state.json, dataset_dict.json)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(
            f"{path}: not a readable {what} ({type(exc).__name__}); re-save the dataset with save_to_disk"
        ) from exc


def _hub_dataset(reference: str) -> Iterator[RawRow]:
    """hf:NAME[:SPLIT] through datasets.load_dataset (split default: train)."""
    spec = reference.removeprefix(HUB_PREFIX)
    name, _, split = spec.rpartition(":") if spec.count(":") else (spec, "", "train")
    if not name or not split:
        raise UserError(f"--data {reference}: use hf:ORG/NAME or hf:ORG/NAME:SPLIT")
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"--data {reference}: needs the datasets package; pip install 'hydra-edge[hub]'") from exc
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - not found, no such split, offline, a damaged cache: all the user's to fix
        root = exc
        while root.__cause__ is not None:  # datasets wraps a builder's failure ("An error occurred ...")
            root = root.__cause__
        first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise UserError(
            f"--data {reference}: cannot be loaded ({first}); check the name and the split, and that it is "
            "downloaded when offline (HF_HUB_OFFLINE=1 reads the cache only)"
        ) from exc
    if len(rows) == 0:
        yield RawRow(f"{reference}:row 1", problem=("empty file", "no rows"))
    for index, row in enumerate(rows, start=1):
        yield RawRow(f"{reference}:row {index}", row)


def _datasets_folder(folder: Path) -> Iterator[RawRow]:
    """A `save_to_disk` folder: state.json names the Arrow stream files (DatasetDict: use train).
    Every name read from the folder's own files must stay inside the folder."""
    import pyarrow as pa

    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = _read_json_file(dict_file, "dataset_dict.json")
        splits = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(splits, list) or not splits:
            raise UserError(f"{dict_file}: no 'splits' list; re-save the dataset with save_to_disk")
        split = "train" if "train" in splits else splits[0]
        folder = path_inside(folder, split, dict_file)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise UserError(f"--data {folder}: a folder must be one written by datasets' save_to_disk (state.json missing)")
    state = _read_json_file(state_file, "state.json")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{state_file}: no '_data_files' list; re-save the dataset with save_to_disk")
    files = [path_inside(folder, e.get("filename"), state_file) for e in entries]

    def batches():
        for file in files:
            with pa.memory_map(str(file)) as source:
                yield from pa.ipc.open_stream(source)

    yield from _arrow_batches(folder, batches(), None)


def _arrow_batches(path: Path, batches, expected_rows: int | None) -> Iterator[RawRow]:
    import pyarrow as pa

    index = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                index += 1
                yield RawRow(f"{path}:row {index}", row)
    except (OSError, pa.ArrowException) as exc:  # a damaged Parquet or Arrow file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: unreadable after row {index} ({first}); the file is damaged, re-save it") from exc
    if index == 0:
        yield RawRow(f"{path}:1", problem=("empty file", "no rows"))
