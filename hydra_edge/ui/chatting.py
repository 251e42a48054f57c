"""Chatting with a trained adapter (PyTorch) or an ONNX export, for the Chat tab. No gradio here.

Models are loaded once and kept (the two most recently used), because loading costs seconds and
a chat sends many messages. Generation runs in a worker thread that holds the model's lock, so
two browser tabs never generate on one model at once, and the caller just iterates over events:
("route", info) once the router has chosen, then ("text", piece) as tokens arrive.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.inference.engines import open_engine
from hydra_edge.inference.protocol import Engine
from hydra_edge.ui.training import adapter_base
from hydra_edge.ui.workspace import Workspace, format_of_export

KEEP_LOADED = 2


@dataclass
class LoadedModel:
    source: str  # workspace-relative folder
    engine: Engine  # a run's adapter (PyTorch) or an ONNX export
    stamp: tuple  # what was loaded (_stamp): a changed folder is reloaded
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def description(self) -> str:
        return self.engine.describe()


def _marker(folder: Path) -> tuple[str, list[Path]] | None:
    """(backend, the files whose change means the folder must be loaded again)."""
    if (folder / "export_manifest.json").is_file():
        return format_of_export(folder) or "onnx", [folder / "export_manifest.json"]
    if (folder / "adapter_config.json").is_file():
        return "pytorch", [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    return None


def _stamp(files: list[Path]) -> tuple:
    """What identifies the loaded content: the JSON files' bytes (small: a config, or a manifest
    that holds every file's sha256) and the weights' size and modification time."""
    import hashlib

    return tuple(
        None
        if not p.exists()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        if p.suffix == ".json"
        else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
    )


class ChatModels:
    """The loaded models, by workspace folder."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def sources(self) -> list[str]:
        """What can be chatted with: finished runs (adapters), ONNX and GGUF exports."""
        return self.ws.runs(finished_only=True) + self.ws.exports("onnx") + self.ws.exports("gguf")

    def get(self, source: str) -> LoadedModel:
        folder = self.ws.resolve(source, "model to chat with", kind="dir")
        found = _marker(folder)
        if found is None:
            raise UserError(
                f"{self.ws.rel(folder)}: neither a finished run (adapter_config.json) nor an ONNX or GGUF export "
                "(export_manifest.json); pick one from the list"
            )
        backend, markers = found
        if backend not in ("onnx", "gguf", "pytorch"):
            raise UserError(
                f"{self.ws.rel(folder)}: a --format {backend} export runs elsewhere (see its README); pick another"
            )
        key, stamp = str(folder), _stamp(markers)
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and cached.stamp == stamp:
                self._loaded.move_to_end(key)
                return cached
            if backend == "onnx":
                engine = open_engine(None, folder)
            elif backend == "gguf":
                engine = open_engine(None, None, gguf=folder)
            else:
                engine = open_engine(folder, None, model_override=adapter_base(self.ws, folder))
            loaded = LoadedModel(self.ws.rel(folder), engine, stamp)
            self._loaded[key] = loaded
            while len(self._loaded) > KEEP_LOADED:
                self._loaded.popitem(last=False)
            return loaded


def stream_reply(
    loaded: LoadedModel,
    messages: list[dict],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    base_only: bool = False,
) -> Iterator[tuple[str, object]]:
    """Yields ("route", {cluster, gates}) and then ("text", piece) events; the last answer is the
    concatenation of the pieces. base_only: the adapter switched off (PyTorch adapters only)."""
    engine = loaded.engine
    events: queue.Queue = queue.Queue()
    done = object()

    def put_text(piece: str) -> None:
        events.put(("text", piece))

    def work() -> None:
        try:
            with loaded.lock:
                if base_only:
                    with engine.base_only():
                        events.put(("route", {"cluster": None, "gates": None}))
                        engine.answer(messages, max_new_tokens, temperature, top_p, put_text)
                    return
                # The same routing as `hydra-edge chat`: the request router on the conversation
                # (inference/protocol.py), and where the engine has one, the per-token router's gate mix.
                gates = engine.gate_mix(messages)
                route = {"cluster": engine.route(messages), "gates": gates and [round(g, 4) for g in gates]}
                events.put(("route", route))
                engine.answer(messages, max_new_tokens, temperature, top_p, put_text)
        except BaseException as exc:  # handed to the caller, which raises it
            events.put(("error", exc))
        finally:
            events.put(done)

    threading.Thread(target=work, daemon=True, name="hydra-ui-chat").start()
    while True:
        event = events.get()
        if event is done:
            return
        if event[0] == "error":
            raise event[1]
        yield event
