"""The PyTorch engine (engines.Engine): a trained adapter on its base, as training left it.

Its router works per token, so every cluster is served by the same model and the cluster only
labels the request; the routed cluster is still reported, from the same request router the
exports use. Scoring and generation run in batches (an export's engine goes row by row).

Generation runs one request at a time (a lock): pinning a cluster or the base sets the layers'
gates for the whole model, and PyTorch already uses every core for one sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from threading import Lock

import torch

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.gates import cluster_gates
from hydra_edge.adapter.switches import fixed_gates, heads_disabled, training_switches_paused
from hydra_edge.clusters.fit import ClusterModel
from hydra_edge.data.records import IGNORE_INDEX, collate, routing_text
from hydra_edge.inference.protocol import OnText, Sampling, ServeAs, answer_by_streaming
from hydra_edge.inference.trained import generate_greedy, load_trained, prompt_gate_mix, stream_tokens
from hydra_edge.models.lm_head import deferred_head, label_losses, supports_deferred_head


class TorchEngine:
    backend = "pytorch"

    def __init__(
        self,
        model,
        tokenizer,
        clusters: ClusterModel,
        config: AdapterConfig | None = None,
        gates: dict[int, dict] | None = None,
    ) -> None:
        self.model, self._tokenizer, self.clusters, self.config = model, tokenizer, clusters, config
        self.gates = gates or {}  # {cluster: {module: ḡ (N,)}}: what pins a cluster
        self._generating = Lock()
        model.eval()  # no dropout: scores and answers are deterministic

    @classmethod
    def load(cls, adapter_dir: str | Path, model_override: str | None = None, device: str | None = None):
        trained = load_trained(adapter_dir, model_override, device)
        gates = cluster_gates(trained.adapter_dir)
        return cls(trained.model, trained.tokenizer, trained.clusters, trained.config, gates)

    def route(self, messages: list[dict]) -> int:
        return int(self.clusters.assign([routing_text(messages)])[0])

    def tokenizer(self, cluster: int):
        return self._tokenizer

    @torch.no_grad()
    def logits(self, cluster: int, input_ids: list[int]):
        device = next(self.model.parameters()).device
        return self.model(input_ids=torch.tensor([input_ids], device=device)).logits[0].float().cpu().numpy()

    def answer(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, on_text: OnText | None = None):
        return answer_by_streaming(self, messages, max_new_tokens, temperature, top_p, on_text)

    def stream(self, prompt_ids: list[int], cluster: int, serve_as: ServeAs, sampling: Sampling) -> Iterator[str]:
        switch = {
            "routed": nullcontext,
            "cluster": lambda: fixed_gates(self.model, self.gates[cluster]),
            "base": lambda: heads_disabled(self.model),
        }[serve_as]
        with self._generating, switch():
            yield from stream_tokens(self.model, self._tokenizer, prompt_ids, sampling)

    def forceable_clusters(self) -> list[int]:
        return sorted(self.gates)

    def serves_base(self) -> bool:
        return True

    def context_length(self, cluster: int) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or self._tokenizer.model_max_length)

    def describe(self) -> str:
        if self.config is None:
            return "adapter in training"
        c = self.config
        return f"adapter on {c.base_model} ({c.quant}), {c.heads} heads, rank {c.rank}"

    def gate_mix(self, messages: list[dict]) -> list[float]:
        return prompt_gate_mix(self.model, self._tokenizer, messages)

    def base_only(self) -> AbstractContextManager[None]:
        return heads_disabled(self.model)

    @torch.no_grad()
    def token_losses(self, samples: list, clusters: list[int], progress=None, batch_size: int = 4):
        """With the head on labelled positions only (hydra_edge/models/lm_head.py): full (B, T, vocab)
        logits would be about 2.5 GB per row at 4k tokens with a 150k vocabulary."""
        model, pad_id = self.model, self._tokenizer.pad_token_id
        device = next(model.parameters()).device
        results = []
        for i in range(0, len(samples), batch_size):
            batch = collate(samples[i : i + batch_size], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)  # (B, T)
            if supports_deferred_head(model, ids, training_switches_paused):
                with deferred_head(model):
                    hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, H)
                losses, rows = label_losses(model, hidden, labels)  # (n,), (n,)
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (B, T, V)
                valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1][valid], labels[:, 1:][valid], reduction="none"
                )
                rows = valid.nonzero()[:, 0]
            sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=device).index_add_(0, rows, losses.float())
            counts = torch.bincount(rows, minlength=ids.shape[0])
            results.extend((float(sums[row]), int(counts[row])) for row in range(ids.shape[0]))
            if progress is not None:
                progress.update(ids.shape[0], int(mask.sum()))
        return results

    def greedy_answers(self, conversations, clusters, max_new_tokens: int, progress=None) -> list[str]:
        return generate_greedy(self.model, self._tokenizer, conversations, max_new_tokens, progress=progress)
