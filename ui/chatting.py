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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hydra_edge.errors import UserError
from hydra_edge.ui.workspace import Workspace

KEEP_LOADED = 2


@dataclass
class LoadedModel:
    source: str  # workspace-relative folder
    backend: str  # "pytorch" (an adapter) or "onnx" (an export)
    handle: object  # TrainedModel or the ONNX engine
    stamp: float  # mtime of the weights/manifest when loaded: a changed folder is reloaded
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def description(self) -> str:
        if self.backend == "onnx":
            manifest = self.handle.manifest
            return f"ONNX export ({manifest['mode']}, {manifest['precision']}), {len(manifest['clusters'])} clusters"
        config = self.handle.config
        return f"adapter on {config['base_model']} ({config['quantization']}), {config['heads']} heads, r={config['r']}"


def _marker(folder: Path) -> tuple[str, Path] | None:
    if (folder / "export_manifest.json").is_file():
        return "onnx", folder / "export_manifest.json"
    if (folder / "adapter_config.json").is_file():
        return "pytorch", folder / "adapter_model.safetensors"
    return None


class ChatModels:
    """The loaded models, by workspace folder."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def sources(self) -> list[str]:
        """What can be chatted with: finished runs (adapters) and exports."""
        return self.ws.runs(finished_only=True) + self.ws.exports()

    def get(self, source: str) -> LoadedModel:
        folder = self.ws.resolve(source, "model to chat with", kind="dir")
        found = _marker(folder)
        if found is None:
            raise UserError(
                f"{self.ws.rel(folder)}: neither a finished run (adapter_config.json) nor an ONNX export "
                "(export_manifest.json); pick one from the list"
            )
        backend, marker = found
        key, stamp = str(folder), marker.stat().st_mtime
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and cached.stamp == stamp:
                self._loaded.move_to_end(key)
                return cached
            if backend == "onnx":
                from hydra_edge.engines import load_engine

                handle = load_engine("onnx", folder)
            else:
                from hydra_edge.inference import load_trained

                handle = load_trained(folder)
            loaded = LoadedModel(self.ws.rel(folder), backend, handle, stamp)
            self._loaded[key] = loaded
            while len(self._loaded) > KEEP_LOADED:
                self._loaded.popitem(last=False)
            return loaded


@contextmanager
def heads_disabled(model):
    """The base model alone: every HydraLoRA layer's gates fixed to zero, so its branch adds
    exactly nothing (y = W0·x). Restores the layers' gates afterwards.

    The core has no switch for this; `fixed_gates` (the export's per-cluster gates) does the job.
    """
    import torch

    from hydra_edge.adapter import hydra_layers

    layers = hydra_layers(model)
    saved = {name: layer.fixed_gates for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.fixed_gates = torch.zeros(layer.num_heads)
        yield
    finally:
        for name, layer in layers.items():
            layer.fixed_gates = saved[name]


def stream_reply(loaded: LoadedModel, messages: list[dict], max_new_tokens: int, temperature: float,
                 top_p: float, base_only: bool = False) -> Iterator[tuple[str, object]]:
    """Yields ("route", {cluster, gates}) and then ("text", piece) events; the last answer is the
    concatenation of the pieces. base_only: the adapter switched off (PyTorch adapters only)."""
    if base_only and loaded.backend != "pytorch":
        raise UserError("comparing with the base model needs a PyTorch adapter (a run), not an ONNX export")
    events: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            with loaded.lock:
                if loaded.backend == "onnx":
                    engine = loaded.handle
                    events.put(("route", {"cluster": engine.route(messages), "gates": None}))
                    engine.answer(messages, max_new_tokens, temperature, top_p, lambda piece: events.put(("text", piece)))
                else:
                    _pytorch_reply(loaded.handle, messages, max_new_tokens, temperature, top_p, base_only, events)
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


def _pytorch_reply(trained, messages, max_new_tokens, temperature, top_p, base_only, events) -> None:
    from hydra_edge.inference import prompt_gate_mix, stream_answer

    def put_text(piece: str) -> None:
        events.put(("text", piece))

    if base_only:
        events.put(("route", {"cluster": None, "gates": None}))
        with heads_disabled(trained.model):
            stream_answer(trained.model, trained.tokenizer, messages, max_new_tokens, temperature, top_p, put_text)
        return
    # The same routing as `hydra-edge chat`: the request router on the last message, and the
    # router's mean gate per head over the prompt.
    cluster = int(trained.clusters.assign([messages[-1]["content"]])[0])
    gates = prompt_gate_mix(trained.model, trained.tokenizer, messages)
    events.put(("route", {"cluster": cluster, "gates": [round(g, 4) for g in gates]}))
    stream_answer(trained.model, trained.tokenizer, messages, max_new_tokens, temperature, top_p, put_text)
