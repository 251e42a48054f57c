"""The workspace the UI's workspace tests start from (a plain module: test files import it)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra_edge.ui.workspace import Workspace


def workspace_with_links(tmp_path: Path) -> Workspace:
    """A workspace with a data file, a run folder, a secret file outside it, a symlink in data/
    that leads out (data/escape) and one that stays inside (data/alias.jsonl)."""
    workspace = Workspace(tmp_path / "ws")
    (workspace.root / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    (workspace.root / "runs" / "r1").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    os.symlink(outside, workspace.root / "data" / "escape")  # a link that leads out
    os.symlink(workspace.root / "data" / "train.jsonl", workspace.root / "data" / "alias.jsonl")  # stays inside
    return workspace
