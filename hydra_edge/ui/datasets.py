"""Data in the workspace: storing uploads, validating files, finding their clusters.

Thin wrappers over the library (`hydra_edge.data.records.load_records`, `hydra_edge.clusters.fit`) that
take workspace paths and return plain dicts for the UI and its API. No gradio here.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from hydra_edge.cli.settings import ClusterSettings
from hydra_edge.errors import UserError
from hydra_edge.ui.workspace import DATA_DIR, DATA_SUFFIXES, Workspace

MAX_PROBLEMS_SHOWN = 200


def _safe_file_name(name: str) -> str:
    """An uploaded file's name reduced to a plain one: no folders, no odd characters."""
    base = Path(str(name).replace("\\", "/")).name
    stem, dot, extension = base.rpartition(".")
    stem, suffix = (stem, "." + extension.lower()) if dot else (base, "")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80] or "upload"
    return stem + suffix


def store_upload(ws: Workspace, uploaded: str | Path, max_bytes: int, original_name: str | None = None) -> dict:
    """Copies an uploaded file into <workspace>/data/ under a safe, unused name, then validates it."""
    uploaded = Path(uploaded)
    size = uploaded.stat().st_size
    if size > max_bytes:
        raise UserError(f"upload: the file is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit")
    name = _safe_file_name(original_name or uploaded.name)
    if not name.endswith(DATA_SUFFIXES):
        raise UserError(f"upload {name}: use a {', '.join(DATA_SUFFIXES)} file")
    stem, suffix = os.path.splitext(name)
    target = ws.root / DATA_DIR / name
    n = 1
    while target.exists():
        target = ws.root / DATA_DIR / f"{stem}-{n}{suffix}"
        n += 1
    shutil.copyfile(uploaded, target)
    return {"file": ws.rel(target), "bytes": size, **validate_data(ws, ws.rel(target))}


def validate_data(ws: Workspace, data: str, fmt: str = "auto") -> dict:
    """Detected format, valid row count and per-row problems of one data file (nothing raised
    for bad rows: the UI lists them, all of them even when no row is valid, before a run would
    stop on them)."""
    from hydra_edge.data.records import load_records

    path = ws.data_source(data)
    loaded = load_records([str(path)], fmt or "auto", skip_invalid=True, require_rows=False)
    detected = next(iter(loaded.formats.values()), "unknown")
    shown = [
        {"location": _short_location(ws, p.location), "reason": p.reason, "detail": p.detail}
        for p in loaded.problems[:MAX_PROBLEMS_SHOWN]
    ]
    return {
        "file": ws.rel(path),
        "format": detected,
        "rows": len(loaded.records),
        "invalid": len(loaded.problems),
        "problems": shown,
    }


def _short_location(ws: Workspace, location: str) -> str:
    """`/abs/ws/data/x.jsonl:12` -> `data/x.jsonl:12`."""
    root = str(ws.root) + os.sep
    return location[len(root) :] if location.startswith(root) else location


DEFAULT_MAX_K = ClusterSettings.__dataclass_fields__["max_k"].default


def find_clusters(
    ws: Workspace, data: str, fmt: str = "auto", max_k: int = DEFAULT_MAX_K, heads: str | int | None = "auto"
) -> tuple[dict, object]:
    """What `--heads auto` would find in a file: k, sizes, top terms, the elbow curve; plus the
    picture `hydra-edge clusters --plot` draws (a PIL image)."""
    from hydra_edge.clusters.fit import fit_clusters
    from hydra_edge.clusters.plots import plot_clusters
    from hydra_edge.data.records import load_records

    path = ws.data_source(data)
    try:
        max_k = int(max_k)
    except (TypeError, ValueError):
        raise UserError(f"max k: {max_k!r} is not a whole number") from None
    heads = "auto" if heads in (None, "") else str(heads).strip()
    try:  # the same settings, and checks, as `hydra-edge clusters`
        settings = ClusterSettings(data=[str(path)], format=fmt or "auto", max_k=max_k, heads=heads)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    loaded = load_records(settings.data, settings.format, skip_invalid=True)
    texts = [r.prompt_text for r in loaded.records]
    model, labels = fit_clusters(texts, settings.fixed_heads, settings.max_k)
    examples = []
    for c in range(model.k):
        first = next((t for t, label in zip(texts, labels) if label == c), "")
        examples.append(first.replace("\n", " ")[:160])
    result = {
        "file": ws.rel(path),
        "rows": len(texts),
        "skipped_invalid": len(loaded.problems),
        "k": model.k,
        "sizes": [int(s) for s in model.sizes],
        "top_terms": model.top_terms(8),
        "inertia_by_k": {str(k): float(v) for k, v in sorted(model.inertia_by_k.items())},
        "examples": examples,
    }
    with tempfile.TemporaryDirectory(prefix="hydra-ui-plot-") as tmp:
        png = Path(tmp) / "clusters.png"
        plot_clusters(model, png)
        from PIL import Image

        with Image.open(png) as image:
            picture = image.convert("RGB")
    return result, picture
