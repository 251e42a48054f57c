"""Held-out scoring: loss, perplexity and exact-match, overall and per cluster.

Exact-match counts rows whose last message is the assistant's reference answer: the model
answers the conversation before it greedily, and the stripped texts must be equal.
"""

from __future__ import annotations

import math

from hydra_edge.data.records import IGNORE_INDEX, Record, tokenize_record
from hydra_edge.progress import PhaseProgress


def evaluate(
    engine,
    records: list[Record],
    seq_len: int,
    max_new_tokens: int,
    report_progress: bool = False,
    em_rows: int | None = None,
) -> dict:
    """{"loss", "perplexity", "exact_match", "n", "per_cluster": {c: {...}}} of an engine
    (hydra_edge/inference/protocol.py): each row is routed, scored with its cluster's weights and answered
    greedily (the first `em_rows` rows with an answer, or all). With report_progress, a progress
    line per phase (held-out loss, then answers)."""
    cluster_ids = [engine.route(r.as_messages) for r in records]
    samples = [tokenize_record(engine.tokenizer(c), r, seq_len) for r, c in zip(records, cluster_ids)]
    with_answer = [i for i, r in enumerate(records) if r.reference_answer is not None][:em_rows]
    loss_progress = PhaseProgress("eval loss", len(samples)) if report_progress else None
    answer_progress = PhaseProgress("eval answers", len(with_answer)) if report_progress else None
    token_losses = engine.token_losses(samples, cluster_ids, progress=loss_progress)
    answers = engine.greedy_answers(
        [records[i].messages[:-1] for i in with_answer],
        [cluster_ids[i] for i in with_answer],
        max_new_tokens,
        progress=answer_progress,
    )
    correct = {i: answers[j] == records[i].reference_answer.strip() for j, i in enumerate(with_answer)}
    return _scores(token_losses, correct, cluster_ids)


def rowwise_token_losses(engine, samples: list, clusters: list[int], progress=None) -> list[tuple[float, int]]:
    """Engine.token_losses one row at a time from engine.logits: for engines that run one
    sequence per call (an export)."""
    import numpy as np

    results = []
    for sample, cluster in zip(samples, clusters):
        logits = engine.logits(cluster, sample.input_ids)[:-1]  # (T-1, V)
        labels = np.array(sample.labels[1:], dtype=np.int64)  # int even when empty
        valid = labels != IGNORE_INDEX
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        results.append((float(-log_probs[valid, labels[valid]].sum()), int(valid.sum())))
        if progress is not None:
            progress.update(1, len(sample.input_ids))
    return results


def _scores(token_losses: list[tuple[float, int]], correct: dict[int, bool], cluster_ids: list[int]) -> dict:
    """{"loss", "perplexity", "exact_match", "n", "per_cluster"} from per-row results."""

    def score(indices: list[int]) -> dict:
        loss_sum = sum(token_losses[i][0] for i in indices)
        tokens = sum(token_losses[i][1] for i in indices)
        loss = loss_sum / tokens if tokens else None  # None, not NaN: the result is strict JSON
        matched = [correct[i] for i in indices if i in correct]
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)) if tokens else None,
            "exact_match": sum(matched) / len(matched) if matched else None,
            "n": len(indices),
        }

    result = score(list(range(len(token_losses))))
    result["per_cluster"] = {
        str(c): score([i for i, ci in enumerate(cluster_ids) if ci == c]) for c in sorted(set(cluster_ids))
    }
    return result
