"""Which engine runs a folder: `--adapter DIR` (PyTorch, `torch_engine.py`) or an engine above
the core found through the `hydra_edge.engines` entry points (the ONNX export's, `--onnx DIR`; the
GGUF export's, `--gguf DIR`), so the core never imports it."""

from __future__ import annotations

from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.inference.protocol import Engine

# The extra that installs each engine's runtime.
EXTRAS = {"onnx": "export", "gguf": "llama"}


def load_engine(name: str, folder: str | Path) -> Engine:
    """An engine installed above the core (`onnx`), found through the `hydra_edge.engines` entry points."""
    from importlib.metadata import entry_points

    if not Path(folder).is_dir():
        raise UserError(f"--{name} {folder}: no such folder")
    found = list(entry_points(group="hydra_edge.engines", name=name))
    if not found:
        raise UserError(f"--{name}: no {name} engine installed; pip install 'hydra-edge[{EXTRAS[name]}]'")
    try:
        engine_class = found[0].load()
    except ImportError as exc:
        raise UserError(
            f"--{name}: the {name} engine cannot load ({exc}); pip install 'hydra-edge[{EXTRAS[name]}]'"
        ) from exc
    return engine_class(folder)


def open_engine(
    adapter: str | None, onnx: str | None, model_override: str | None = None, gguf: str | None = None
) -> Engine:
    """The engine for `--adapter DIR` (PyTorch, optionally on another copy of its base), `--onnx DIR`
    or `--gguf DIR` (an export, in ONNX Runtime or llama.cpp): exactly one of them."""
    if sum(bool(x) for x in (adapter, onnx, gguf)) != 1:
        raise UserError(
            "give one of --adapter DIR (PyTorch), --onnx DIR or --gguf DIR (an export), not several or none"
        )
    if onnx:
        return load_engine("onnx", onnx)
    if gguf:
        return load_engine("gguf", gguf)
    from hydra_edge.inference.torch_engine import TorchEngine  # torch loads only when an adapter is opened

    return TorchEngine.load(adapter, model_override)
