"""Damaged versions of a file's bytes, shared by the fuzz tests (a plain module, not a test)."""

from __future__ import annotations

import json
import random

SEED = 20261129
DEEP = b"[" * 200_000 + b"]" * 200_000


def damaged_versions(data: bytes, is_json: bool, name: str) -> dict[str, bytes]:
    """Truncations, garbage and bit flips of a file's bytes (plus JSON of the wrong shape)."""
    rng = random.Random(f"{SEED}:{name}")
    versions = {
        "empty": b"",
        "one byte": data[:1],
        "half": data[: len(data) // 2],
        "last 7 bytes cut": data[:-7],
        "garbage": rng.randbytes(min(len(data), 4096)),
    }
    for label, position in (
        ("header", rng.randrange(min(len(data), 64))),
        ("middle", len(data) // 2),
        ("random", rng.randrange(len(data))),
    ):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        versions[f"bit flip ({label} @{position})"] = bytes(flipped)
    if is_json:
        versions.update(
            {
                "array": b"[]",
                "string": b'"x"',
                "null": b"null",
                "deep": DEEP,
                "huge number": b"1e999",
                "invalid UTF-8": b'{"a": "\xff\xfe"}',
            }
        )
        try:
            original = json.loads(data)
        except ValueError:
            original = None
        if isinstance(original, dict):  # the same keys with values of the wrong type
            versions["wrong types"] = json.dumps(
                {k: [v] if not isinstance(v, list) else {"x": v} for k, v in original.items()}
            ).encode()
            versions["keys dropped"] = json.dumps(dict(list(original.items())[: len(original) // 2])).encode()
    return versions
