"""Damaged versions of a file's bytes, shared by the fuzz tests (a plain module, not a test)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

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


def spoiled_copy(source: Path, target: Path, rel: str, content: bytes) -> Path:
    """A copy of `source` (hard links: cheap) with one file replaced by `content`."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=os.link)
    victim = target / rel
    victim.unlink()
    victim.write_bytes(content)
    return target


def resigned_copy(source: Path, target: Path, rel: str, content: bytes) -> Path:
    """spoiled_copy with the manifest's sha256 of the file updated to match: the damage gets past
    the manifest check and reaches the loaders, as a file damaged before it was signed would."""
    folder = spoiled_copy(source, target, rel, content)
    manifest_path = folder / "export_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][rel] = hashlib.sha256(content).hexdigest()
    manifest_path.unlink()  # a hard link to the original: replace, do not write through
    manifest_path.write_text(json.dumps(manifest))
    return folder
