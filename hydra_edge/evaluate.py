"""Held-out scoring: loss, perplexity and exact-match, overall and per cluster.

Exact-match counts rows whose last message is the assistant's reference answer: the model
answers the conversation before it greedily, and the stripped texts must be equal.
"""

from __future__ import annotations

import math

import torch

from hydra_edge.clustering import ClusterModel
from hydra_edge.data import IGNORE_INDEX, Record, collate, tokenize_record
from hydra_edge.inference import generate_greedy
from hydra_edge.lm_head import deferred_head, label_losses, supports_deferred_head
from hydra_edge.progress import PhaseProgress


@torch.no_grad()
def _token_losses(model, samples, pad_id: int, batch_size: int = 4, progress: PhaseProgress | None = None) -> list[tuple[float, int]]:
    """(summed cross-entropy, label-token count) per sample, with the head on labelled
    positions only (hydra_edge/lm_head.py): full (B, T, vocab) logits would be about 2.5 GB per
    row at 4k tokens with a 150k vocabulary."""
    device = next(model.parameters()).device
    results = []
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i : i + batch_size], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)  # (B, T)
        if supports_deferred_head(model, ids):
            with deferred_head(model):
                hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, H)
            losses, rows = label_losses(model, hidden, labels)  # (n,), (n,)
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (B, T, V)
            valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1][valid], labels[:, 1:][valid], reduction="none")
            rows = valid.nonzero()[:, 0]
        sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=device).index_add_(0, rows, losses.float())
        counts = torch.bincount(rows, minlength=ids.shape[0])
        results.extend((float(sums[row]), int(counts[row])) for row in range(ids.shape[0]))
        if progress is not None:
            progress.update(ids.shape[0], int(mask.sum()))
    return results


def evaluate(model, tokenizer, records: list[Record], clusters: ClusterModel, seq_len: int, max_new_tokens: int,
             report_progress: bool = False) -> dict:
    """{"loss", "perplexity", "exact_match", "n", "per_cluster": {c: {...}}}; with
    report_progress, a progress line per phase (held-out loss, then greedy answers)."""
    model.eval()
    samples = [tokenize_record(tokenizer, r, seq_len) for r in records]
    cluster_ids = clusters.assign([r.prompt_text for r in records]).tolist()
    with_answer = [i for i, r in enumerate(records) if r.reference_answer is not None]
    loss_progress = PhaseProgress("eval loss", len(samples)) if report_progress else None
    answer_progress = PhaseProgress("eval answers", len(with_answer)) if report_progress else None
    token_losses = _token_losses(model, samples, tokenizer.pad_token_id, progress=loss_progress)
    answers = generate_greedy(model, tokenizer, [records[i].messages[:-1] for i in with_answer], max_new_tokens,
                              progress=answer_progress)
    correct = {i: answers[j] == records[i].reference_answer.strip() for j, i in enumerate(with_answer)}

    return _scores(token_losses, correct, cluster_ids)


def evaluate_engine(engine, records: list[Record], seq_len: int, max_new_tokens: int) -> dict:
    """The same scores for an export served by an engine (hydra_edge/engines.py): each row is
    routed to its cluster, scored with that cluster's weights and answered greedily."""
    import numpy as np

    clusters, token_losses, correct = [], [], {}
    for i, record in enumerate(records):
        cluster = engine.route_text(record.prompt_text)
        clusters.append(cluster)
        sample = tokenize_record(engine.tokenizer(cluster), record, seq_len)
        logits = engine.logits(cluster, sample.input_ids)[:-1]  # (T-1, V)
        labels = np.array(sample.labels[1:])
        valid = labels != IGNORE_INDEX
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        token_losses.append((float(-log_probs[valid, labels[valid]].sum()), int(valid.sum())))
        if record.reference_answer is not None:
            _, answer = engine.answer(record.messages[:-1], max_new_tokens=max_new_tokens)
            correct[i] = answer == record.reference_answer.strip()
    return _scores(token_losses, correct, clusters)


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
