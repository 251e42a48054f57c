"""How big Arrow data is once decoded, measured without decoding it, and decoding only chosen rows.

A Parquet or Arrow file can name one 10 MB string a thousand times through a dictionary, or hold
a list of a million empty strings, in a few kilobytes; turned into Python objects, it takes
gigabytes. So sources.py measures every row here first (cell_sizes: characters of text, bytes of
binary, summed through structs, lists and dictionaries, a dictionary's values measured once), holds
each cell and each file to its limits, and only then decodes the rows that passed (python_rows),
a slice at a time. The limits themselves live in sources.py, beside the CSV limit they share;
this module is only the arithmetic on Arrow arrays.
"""

from __future__ import annotations

from collections.abc import Iterator

SLICE_ROWS = 1024  # rows turned into Python objects at a time


def python_rows(part, keep) -> Iterator[dict]:
    """The rows numbered `keep` of a measured part as Python dicts, SLICE_ROWS at a time: taken
    (a compact copy, dictionaries still shared), then cast to the types without dictionaries, so
    that only those rows are decoded. A slice would not do: to_pylist or a cast of a slice
    converts a list column's whole child array, or a whole dictionary, every time."""
    import pyarrow as pa

    plain = pa.schema([field.with_type(_without_dictionaries(field.type)) for field in part.schema])
    for start in range(0, len(keep), SLICE_ROWS):
        piece = part.take(pa.array(keep[start : start + SLICE_ROWS]))
        yield from (piece.cast(plain) if plain != part.schema else piece).to_pylist()


def _without_dictionaries(t):
    """The type `t` with every dictionary replaced by its value type (what to_pylist gives)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _without_dictionaries(t.value_type)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_without_dictionaries(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_without_dictionaries(t.key_type), _without_dictionaries(t.item_type))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        field = t.value_field.with_type(_without_dictionaries(t.value_type))
        if pa.types.is_fixed_size_list(t):
            return pa.list_(field, t.list_size)
        return pa.large_list(field) if pa.types.is_large_list(t) else pa.list_(field)
    return t


class DictionarySizes:
    """The sizes of the dictionaries the last part (record batch) and this one use, so that a
    dictionary an Arrow stream's batches share is measured once, not once a batch. Each entry
    holds its dictionary, so that the buffers' addresses it is found by stay its own."""

    def __init__(self) -> None:
        self.last: dict = {}
        self.now: dict = {}

    def next_part(self) -> None:
        self.last, self.now = self.now, {}

    def of(self, dictionary):
        key = (dictionary.offset, len(dictionary), *(b.address if b is not None else 0 for b in dictionary.buffers()))
        entry = self.now.get(key) or self.last.get(key) or (dictionary, cell_sizes(dictionary, self))
        self.now[key] = entry
        return entry[1]


def column_sizes(column, dictionaries: DictionarySizes):
    """cell_sizes of an Array or a ChunkedArray (a Parquet row group's column)."""
    import numpy as np

    chunks = getattr(column, "chunks", [column])
    return np.concatenate([cell_sizes(c, dictionaries) for c in chunks] or [np.zeros(0, dtype=np.int64)])


def cell_sizes(array, dictionaries: DictionarySizes | None = None):
    """Each value's size once decoded, as a numpy array: characters of text, bytes of binary and
    fixed-width values, summed through structs, and through lists with one more for each element
    (as its JSON text would have a comma: a list of a million empty strings is not small). A
    dictionary's values are measured once and looked up by index, never expanded: that is what
    keeps a dictionary bomb small here. A type with no rule here (unions, run-end encoded, list
    views: none is training data) counts its whole array for every row, an upper bound."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    dictionaries = dictionaries or DictionarySizes()
    t, n = array.type, len(array)
    if isinstance(array, pa.ExtensionArray):
        return cell_sizes(array.storage, dictionaries)
    valid = array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else np.ones(n, dtype=bool)
    if pa.types.is_dictionary(t):
        values = dictionaries.of(array.dictionary)
        indices = pc.fill_null(array.indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        if n and (indices.min() < 0 or indices.max() >= max(len(values), 1)):
            raise pa.ArrowInvalid("a dictionary index is out of range")
        return np.where(valid, values[indices] if len(values) else 0, 0)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pc.fill_null(pc.utf8_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_struct(t):
        total = np.zeros(n, dtype=np.int64)
        for child in array.flatten():
            total += cell_sizes(child, dictionaries)
        return total
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        running = np.concatenate([[0], np.cumsum(cell_sizes(array.values, dictionaries) + 1)])
        if offsets.min() < 0 or offsets.max() >= len(running):
            raise pa.ArrowInvalid("list offsets out of range")
        return np.where(valid, running[offsets[1:]] - running[offsets[:-1]], 0)
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        values = cell_sizes(array.values, dictionaries)[array.offset * size : (array.offset + n) * size] + 1
        return np.where(valid, values.reshape(n, size).sum(axis=1) if size else 0, 0)
    if pa.types.is_null(t):
        return np.zeros(n, dtype=np.int64)
    try:
        width = max(t.bit_width // 8, 1)  # numbers, dates, booleans, fixed-size binary
    except ValueError:  # not fixed-width
        width = array.nbytes
    return np.full(n, width, dtype=np.int64)
