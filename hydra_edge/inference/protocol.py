"""The interface every engine keeps (`Engine`), and how each next token is picked (`Sampling`).

PyTorch (`torch_engine.py`) and the ONNX export's engine implement it; `chat`, `eval`, `serve` and
the web UI's chat talk to an `Engine` and never ask which backend it is. Every engine routes a
conversation with `data.records.routing_text` (all non-assistant turns, the system prompt included:
what the clusters were fitted on in training), so the cluster a request gets does not depend on the
backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from hydra_edge.settings import setting

OnText = Callable[[str], None]

# What serves a request: "routed" is how the engine serves the cluster it routed the request to
# (an export: that cluster's merged adapter; PyTorch: the per-token router), "cluster" pins the
# cluster's merged adapter (mean gates ḡ_c), "base" is the base model with no adapter.
ServeAs = Literal["routed", "cluster", "base"]


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked: greedy when temperature is 0."""

    max_new_tokens: int = setting(256, "Most tokens per answer.", ge=1)
    temperature: float = setting(0.0, "Sampling temperature; 0 = greedy.", ge=0)
    top_p: float = setting(1.0, "Nucleus sampling mass.", ge=0, le=1)
    seed: int | None = setting(None, "Sampling only: the same seed gives the same answer.", ge=0)
    # Generate max_new_tokens tokens (load benchmarks); end tokens are masked.
    ignore_eos: bool = setting(False, "Never stop at an end token (load benchmarks).")


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
    from hydra_edge.data.records import prompt_ids  # torch: imported when an answer is asked for, not by --help

    cluster = engine.route(messages)
    ids = prompt_ids(engine.tokenizer(cluster), messages)
    pieces = []
    for piece in engine.stream(ids, cluster, "routed", Sampling(max_new_tokens, temperature, top_p)):
        pieces.append(piece)
        if on_text is not None and piece:
            on_text(piece)
    return cluster, "".join(pieces).strip()
