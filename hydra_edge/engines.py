"""One interface for every way of running a trained adapter: PyTorch (the adapter on its base,
`torch_engine.py`) and engines above the core (the ONNX export's, found through entry points so
hydra_edge/ never imports them). `chat`, `eval` and the web UI's chat talk to an `Engine` and
never ask which backend it is.

Every engine routes a conversation with `data.routing_text` (all non-assistant turns, the
system prompt included: what the clusters were fitted on in training), so the cluster a request
gets does not depend on the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from hydra_edge.data import prompt_ids
from hydra_edge.errors import UserError

OnText = Callable[[str], None]

# What serves a request: "routed" is how the engine serves the cluster it routed the request to
# (an export: that cluster's merged adapter; PyTorch: the per-token router), "cluster" pins the
# cluster's merged adapter (mean gates ḡ_c), "base" is the base model with no adapter.
ServeAs = Literal["routed", "cluster", "base"]


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked: greedy when temperature is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling only: the same seed gives the same answer
    ignore_eos: bool = False  # generate max_new_tokens tokens (load benchmarks); end tokens are masked


@runtime_checkable
class Engine(Protocol):
    backend: str  # "pytorch", "onnx": what the UI and `--json` outputs report

    def route(self, messages: list[dict]) -> int:
        """The cluster this conversation is served by."""

    def tokenizer(self, cluster: int):
        """The Hugging Face tokenizer (and chat template) serving this cluster."""

    def logits(self, cluster: int, input_ids: list[int]):
        """Teacher-forced next-token logits of one sequence with this cluster's weights. (T, vocab)"""

    def answer(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_text: OnText | None = None,
    ) -> tuple[int, str]:
        """(cluster, answer): routes, then generates; on_text(piece) is called as tokens arrive."""

    def stream(self, prompt_ids: list[int], cluster: int, serve_as: ServeAs, sampling: Sampling) -> Iterator[str]:
        """The answer's text, one piece per generated token ("" while a character is still
        incomplete), ending at an end token or max_new_tokens. Closing the iterator stops the
        generation after the current token. Safe to call from several threads at once."""

    def forceable_clusters(self) -> list[int]:
        """The clusters a request can pin (serve_as="cluster"); none where one model routes
        every token by itself (a dynamic export)."""

    def serves_base(self) -> bool:
        """Whether serve_as="base" (no adapter) is possible."""

    def context_length(self, cluster: int) -> int:
        """The most tokens (prompt and answer) one sequence may hold."""

    def describe(self) -> str:
        """One line on what is loaded, for the chat's routing note."""

    def gate_mix(self, messages: list[dict]) -> list[float] | None:
        """The router's mean gate per head over the prompt, where the engine has a per-token
        router to ask (PyTorch); None elsewhere."""

    def base_only(self) -> AbstractContextManager[None]:
        """Inside it, answers come from the base model alone (UserError where unsupported)."""

    def token_losses(self, samples: list, clusters: list[int], progress=None) -> list[tuple[float, int]]:
        """(summed cross-entropy, label-token count) per tokenized sample, with its cluster's weights."""

    def greedy_answers(
        self, conversations: list[list[dict]], clusters: list[int], max_new_tokens: int, progress=None
    ) -> list[str]:
        """The greedy answer to each conversation, with its cluster's weights."""


def answer_by_streaming(
    engine: Engine, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float, on_text: OnText | None
) -> tuple[int, str]:
    """Engine.answer for every engine: route, render with the cluster's chat template, stream.
    The API server takes the same path, so its answers equal `chat`'s."""
    cluster = engine.route(messages)
    ids = prompt_ids(engine.tokenizer(cluster), messages)
    pieces = []
    for piece in engine.stream(ids, cluster, "routed", Sampling(max_new_tokens, temperature, top_p)):
        pieces.append(piece)
        if on_text is not None and piece:
            on_text(piece)
    return cluster, "".join(pieces).strip()


def load_engine(name: str, folder: str | Path) -> Engine:
    """An engine installed above the core (`onnx`), found through the hydra_edge.engines entry point."""
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


def open_engine(adapter: str | None, onnx: str | None, model_override: str | None = None) -> Engine:
    """The engine for `--adapter DIR` (PyTorch, optionally on another copy of its base) or
    `--onnx DIR` (an export): exactly one of them."""
    if bool(adapter) == bool(onnx):
        raise UserError("give either --adapter DIR (PyTorch) or --onnx DIR (an export), not both or neither")
    if onnx:
        return load_engine("onnx", onnx)
    from hydra_edge.torch_engine import TorchEngine

    return TorchEngine.load(adapter, model_override)
