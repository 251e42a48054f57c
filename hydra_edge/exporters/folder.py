"""An export folder from start to finish, the same for every format: refuse an --out that holds
anything, build in a temporary folder beside it, ship the request router, list every file's sha256
in the manifest, verify the folder as a reader would, and only then rename it into place. A
failed export leaves nothing behind, and no format repeats this plumbing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.errors import UserError
from hydra_edge.exporters.manifest import MANIFEST, verify_export
from hydra_edge.exporters.merge import check_exportable
from hydra_edge.files import disk_errors, ensure_writable_dir, sha256_of

ROUTER_FILES = ("clusters.json", "clusters.safetensors")


def prepare(adapter_dir: Path, out_dir: Path) -> AdapterConfig:
    """The adapter's config once the adapter can be exported and --out can take a new export."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir}: not empty (or not a folder); choose a new folder (nothing was overwritten)")
    config = check_exportable(adapter_dir)
    ensure_writable_dir(out_dir.parent, "--out")
    return config


@contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside --out to build in; removed on every way out (after `seal` it is
    already gone)."""
    with disk_errors(out_dir):  # safetensors' write errors as OSError
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def base_entry(config: AdapterConfig) -> dict:
    """The manifest's `base`: the model the adapter was trained on, and which weights an export holds."""
    weights = f"dequantized {config.quant}" if config.quant != "none" else "as trained"
    return {"model": config.base_model, "fingerprint": config.base_fingerprint, "weights": weights}


def seal(
    work: Path,
    out_dir: Path,
    adapter_dir: Path,
    manifest: dict,
    required_files: Callable[[dict], list[str]],
) -> dict:
    """Ships the router, writes the manifest with every file's sha256, verifies the folder
    (including the files this format must hold) and renames it to --out."""
    (work / "router").mkdir()
    for name in ROUTER_FILES:
        shutil.copy2(adapter_dir / name, work / "router" / name)
    manifest = {"format_version": 1, **manifest, "adapter": str(adapter_dir.resolve())}
    manifest["files"] = {str(p.relative_to(work)): sha256_of(p) for p in sorted(work.rglob("*")) if p.is_file()}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    verify_export(work, required_files)
    if out_dir.exists():
        out_dir.rmdir()
    os.rename(work, out_dir)
    return manifest
