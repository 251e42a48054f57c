"""What every benchmark ends with: its results as JSON (the table is printed by the script)."""

from __future__ import annotations

import json
from pathlib import Path


def save_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
