"""Inference engines above the core (the ONNX export's), found through entry points.

An engine serves an export folder: route(messages) -> cluster, tokenizer(cluster),
logits(cluster, ids) -> (T, vocab), answer(messages, max_new_tokens, temperature, top_p,
on_text) -> (cluster, text). The core knows them only by this shape, never by import.
"""

from __future__ import annotations

from pathlib import Path

from hydra_edge.errors import UserError


def load_engine(name: str, folder: str | Path):
    from importlib.metadata import entry_points

    if not Path(folder).is_dir():
        raise UserError(f"--{name} {folder}: no such folder")
    found = list(entry_points(group="hydra_edge.engines", name=name))
    if not found:
        raise UserError(f"--{name}: no {name} engine installed; pip install 'hydra-edge[export]'")
    try:
        engine_class = found[0].load()
    except ImportError as exc:
        raise UserError(f"--{name}: the {name} engine cannot load ({exc}); pip install 'hydra-edge[export]'") from exc
    return engine_class(folder)
