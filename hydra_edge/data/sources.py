"""Reading rows out of data files, each with the place it came from.

Supported: `.jsonl`, `.json` (an array), `.csv`, `.parquet`, a folder written by Hugging Face
`datasets` (`save_to_disk`, a Dataset or a DatasetDict, whose `train` split is used), and
`hf:ORG/NAME[:SPLIT]`: a dataset `datasets.load_dataset` finds (the Hub or its cache, or a local
dataset folder of data files), rows numbered `hf:ORG/NAME:row N`. Every row
is yielded as `RawRow(location, value)`; a row that cannot even be decoded is yielded with a
`problem` instead, so validation can report every bad row, not just the first.

Parquet and Arrow files can expand without bound when decoded (a dictionary names one 10 MB
string a thousand times in a 1 KB file; a run of nulls compresses to nothing), so their rows are
measured before they become Python objects (columnar.py does the measuring; the limits are
here): a cell over MAX_CELL_CHARS is a row problem, and a file whose rows decode to more than
its share of memory (decoded_limit) is refused in one line.
Text files need no such bound: what they decode to is never larger than the file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra_edge.data.columnar import DictionarySizes, column_sizes, python_rows
from hydra_edge.errors import UserError
from hydra_edge.files import NumberTooLong, parse_json, path_inside

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LONE_SURROGATE = ("invalid text", "a \\uD800-\\uDFFF escape without its pair; it is not a character, remove it")
TOO_DEEP = "nested too deeply to read; a data row holds strings and lists of turns, not deep structures"
# CSV cells are strings; these columns hold lists and arrive JSON-encoded.
JSON_COLUMNS = ("messages", "conversations")
# The longest cell a CSV, Parquet or Arrow row may hold: the csv module's own field limit (its
# default), which CSV files have always had; Parquet and Arrow cells are held to the same, measured
# before decoding. A .jsonl file has no such limit (its rows cannot be larger than the file).
MAX_CELL_CHARS = 131_072
# What a Parquet or Arrow file may decode to: its text plus ROW_COST for each row (about what the
# Python objects of a small row take), at most 1 GiB, or DECODED_PER_FILE_BYTE times the file's
# size for a big file. Real data compresses 3-10x (more with cells repeated through a dictionary,
# such as one system prompt in every row); a file that expands further than this is damaged or
# built to exhaust memory, and 1 GiB of rows is already a few GB of memory once read.
MAX_DECODED_BYTES = 1 << 30
DECODED_PER_FILE_BYTE = 32
ROW_COST = 512
# Parquet logical types stored as BYTE_ARRAY that Arrow reads as text or binary (not decimals):
# the columns read as dictionaries (_parquet).
DICTIONARY_READABLE = ("NONE", "STRING", "JSON", "BSON", "ENUM")


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
            value = parse_json(line)
            bad = SURROGATE_ESCAPE.search(line) is not None and _has_lone_surrogate(value)
            yield RawRow(where, problem=LONE_SURROGATE) if bad else RawRow(where, value)
        except json.JSONDecodeError as exc:
            yield RawRow(where, problem=("malformed JSON", f"{exc.msg} at column {exc.colno}"))
        except NumberTooLong as exc:
            yield RawRow(where, problem=("malformed JSON", str(exc)))
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
        rows = parse_json(text)
    except json.JSONDecodeError as exc:
        yield RawRow(f"{path}:{exc.lineno}", problem=("malformed JSON", f"{exc.msg} at column {exc.colno}"))
        return
    except NumberTooLong as exc:  # json gives no position; the number's digits lead to its line
        line = text.count("\n", 0, max(text.find(exc.digits), 0)) + 1
        yield RawRow(f"{path}:{line}", problem=("malformed JSON", str(exc)))
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
    csv.field_size_limit(MAX_CELL_CHARS)  # its default; set so the one limit holds whoever changed it
    reader = csv.DictReader(io.StringIO(text, newline=""))
    any_row = False
    for i, row in enumerate(_csv_rows(reader), start=1):
        any_row = True
        where = f"{path}:row {i}"
        if isinstance(row, csv.Error):
            too_long = f"a cell is longer than {MAX_CELL_CHARS:,} characters; put long texts in a .jsonl file"
            yield RawRow(where, problem=("malformed CSV", too_long if "field limit" in str(row) else str(row)))
            continue
        if None in row:
            yield RawRow(where, problem=("malformed CSV", "more cells than header columns"))
            continue
        decoded, problem = {}, None
        for key, value in row.items():
            if key in JSON_COLUMNS and value is not None and value.strip():
                try:
                    value = parse_json(value)
                except json.JSONDecodeError as exc:
                    problem = ("malformed JSON", f"column '{key}': {exc.msg}")
                    break
                except NumberTooLong as exc:
                    problem = ("malformed JSON", f"column '{key}': {exc}")
                    break
                except RecursionError:
                    problem = ("malformed JSON", f"column '{key}': {TOO_DEEP}")
                    break
            decoded[key] = value if value != "" else None
        yield RawRow(where, problem=problem) if problem else RawRow(where, decoded)
    if not any_row:
        yield RawRow(f"{path}:1", problem=("empty file", "no rows below the header"))


def _parquet(path: Path) -> Iterator[RawRow]:
    """Rows one row group at a time, every text and binary column read as a dictionary: Arrow
    then keeps a dictionary-encoded column as it is stored (one 10 MB string and a thousand
    indices) instead of copying the string into each row, and _arrow_batches measures the rows
    before any is decoded. Whole row groups, not iter_batches: over batches Arrow rebuilds a
    growing dictionary for each batch, quadratic in the row group. The metadata is checked first
    (uncompressed sizes, values, rows): a file that declares more than decoded_limit is refused
    before a page is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(str(path))
        columns = [metadata.schema.column(i) for i in range(len(metadata.schema))]
        text_columns = [
            c.path for c in columns if c.physical_type == "BYTE_ARRAY" and c.logical_type.type in DICTIONARY_READABLE
        ]
        reader = pq.ParquetFile(str(path), metadata=metadata, read_dictionary=text_columns)
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        declared = ROW_COST * metadata.num_rows + sum(
            group.total_byte_size + sum(group.column(j).num_values for j in range(group.num_columns))
            for group in groups
        )
    except (OSError, pa.ArrowException) as exc:  # ArrowInvalid and friends for damaged files
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from exc
    on_disk = path.stat().st_size
    if declared > decoded_limit(on_disk):
        raise _too_big(path, on_disk, "by its metadata")
    yield from _arrow_batches(path, (reader.read_row_group(i) for i in range(len(groups))), on_disk)


def _read_json_file(path: Path, what: str):
    """A small JSON file written by a library (datasets' state.json, dataset_dict.json)."""
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0] if isinstance(exc, NumberTooLong) else type(exc).__name__
        raise UserError(f"{path}: not a readable {what} ({detail}); re-save the dataset with save_to_disk") from exc


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

    yield from _arrow_batches(folder, batches(), sum(f.stat().st_size for f in files if f.is_file()))


def decoded_limit(on_disk: int) -> int:
    """The most a Parquet or Arrow file of `on_disk` bytes may decode to (see MAX_DECODED_BYTES)."""
    return max(MAX_DECODED_BYTES, DECODED_PER_FILE_BYTE * on_disk)


def _too_big(path: Path, on_disk: int, how: str) -> UserError:
    return UserError(
        f"{path}: its rows decode to more than {decoded_limit(on_disk):,} bytes ({how}), the most read from a "
        f"{on_disk:,}-byte file ({MAX_DECODED_BYTES:,} bytes, or {DECODED_PER_FILE_BYTE} times the file's size if "
        "more); a file that expands this much is damaged or built to exhaust memory: split real data into smaller files"
    )


def _arrow_batches(path: Path, parts, on_disk: int) -> Iterator[RawRow]:
    """Rows out of Arrow tables (Parquet row groups) or record batches (Arrow streams), each part
    measured before any of its rows becomes Python objects (columnar.py): a row with a cell over
    MAX_CELL_CHARS is a row problem and is never decoded, and once the rows so far decode to more
    than decoded_limit the file is refused. Rows are then decoded a slice at a time."""
    import numpy as np
    import pyarrow as pa

    index = decoded = 0
    limit = decoded_limit(on_disk)
    dictionaries = DictionarySizes()
    try:
        for part in parts:
            dictionaries.next_part()
            sizes = [column_sizes(column, dictionaries) for column in part.columns]
            decoded += ROW_COST * part.num_rows + sum(int(s.sum()) for s in sizes)
            if decoded > limit:
                raise _too_big(path, on_disk, f"read up to row {index + part.num_rows:,}")
            too_long = np.zeros(part.num_rows, dtype=bool)
            for s in sizes:
                too_long |= s > MAX_CELL_CHARS
            rows = python_rows(part, np.flatnonzero(~too_long))
            for i in range(part.num_rows):
                index += 1
                if not too_long[i]:
                    yield RawRow(f"{path}:row {index}", next(rows))
                    continue
                name, size = next((n, s[i]) for n, s in zip(part.schema.names, sizes) if s[i] > MAX_CELL_CHARS)
                detail = (
                    f"column '{name}' holds {size:,} characters once decoded, more than the {MAX_CELL_CHARS:,} "
                    "a cell may hold; put long texts in a .jsonl file"
                )
                yield RawRow(f"{path}:row {index}", problem=("cell too long", detail))
    except (OSError, pa.ArrowException) as exc:  # a damaged Parquet or Arrow file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: unreadable after row {index} ({first}); the file is damaged, re-save it") from exc
    if index == 0:
        yield RawRow(f"{path}:1", problem=("empty file", "no rows"))
