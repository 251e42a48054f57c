"""What every export's engine shares: route a conversation with the shipped request router, and
score or answer rows one sequence at a time. The ONNX engine (onnx_chat.py) and the GGUF engine
(gguf_chat.py) differ only in how a cluster's model computes."""

from __future__ import annotations

from pathlib import Path

from hydra_edge.clusters.router import RequestRouter
from hydra_edge.data.records import routing_text
from hydra_edge.errors import UserError
from hydra_edge.inference.evaluate import rowwise_token_losses
from hydra_edge.inference.protocol import OnText, answer_by_streaming


class RoutedExport:
    """The export-independent half of an Engine (hydra_edge.inference.protocol)."""

    def __init__(self, folder: Path) -> None:
        self.router = RequestRouter.from_dir(folder / "router")

    def route(self, messages: list[dict]) -> int:
        return int(self.router.route([routing_text(messages)])[0])

    def gate_mix(self, messages: list[dict]) -> None:
        return None  # the export's gates are per cluster (or inside the dynamic graph)

    def base_only(self):
        raise UserError("comparing with the base model needs a PyTorch adapter (a finished run), not an export")

    def token_losses(self, samples: list, clusters: list[int], progress=None) -> list[tuple[float, int]]:
        return rowwise_token_losses(self, samples, clusters, progress)

    def greedy_answers(self, conversations, clusters, max_new_tokens: int, progress=None) -> list[str]:
        answers = []
        for conversation in conversations:
            answers.append(self.answer(conversation, max_new_tokens=max_new_tokens)[1])
            if progress is not None:
                progress.update(1, 0)
        return answers

    def answer(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, on_text: OnText | None = None):
        return answer_by_streaming(self, messages, max_new_tokens, temperature, top_p, on_text)
