"""What a trained run leaves in --out beside its checkpoints: the adapter and its config, the
per-cluster mean gates export merges with, and the held-out scores."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hydra_edge import __version__
from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.inject import save_adapter
from hydra_edge.files import atomic_write_text
from hydra_edge.progress import PhaseProgress
from hydra_edge.training.adapted_base import AdaptedBase
from hydra_edge.training.config import FinetuneConfig

EVAL_RESULTS = "eval_results.json"
# The training summary's fields the adapter's config keeps.
TRAINING_FIELDS = ("steps", "final_loss", "skipped_steps", "stopped_early", "best_step")


def save_trained_adapter(config: FinetuneConfig, adapted: AdaptedBase, summary: dict, out: Path) -> None:
    """The adapter's weights and adapter_config.json: how it was built, on which base, and how its
    training went."""
    base = adapted.base
    adapter_config = AdapterConfig(
        base_model=base.reference,
        base_model_resolved=base.resolved,
        base_fingerprint=adapted.fingerprint,
        quant=config.quant,
        dtype=adapted.dtype,
        rank=config.rank,
        alpha=config.alpha,
        heads=adapted.heads,
        dropout=config.dropout,
        head_init=config.head_init,
        router=config.router,
        head_dropout=config.head_dropout,
        router_temperature=config.router_temperature,
        router_top_k=adapted.top_k,
        targets=config.targets,
        target_modules=adapted.modules,
        tokenizer=base.resolved,
        chat_template=getattr(base.tokenizer, "chat_template", None),
        hydra_edge_version=__version__,
        training={k: summary[k] for k in TRAINING_FIELDS},
    )
    save_adapter(base.model, out, adapter_config)


def gates_and_score(config, base, samples, clusters, eval_records, summary, out) -> dict:
    """Per-cluster mean gates (what export merges with) and the held-out score of the trained model."""
    from hydra_edge.adapter.gates import mean_gates_per_cluster, save_cluster_gates
    from hydra_edge.inference.evaluate import evaluate
    from hydra_edge.inference.torch_engine import TorchEngine

    gate_rows = sum(min(n, config.gate_samples_per_cluster) for n in Counter(s.cluster for s in samples).values())
    gates, token_counts = mean_gates_per_cluster(
        base.model,
        samples,
        clusters.k,
        base.tokenizer.pad_token_id,
        config.gate_samples_per_cluster,
        progress=PhaseProgress("gates", gate_rows),
    )
    save_cluster_gates(out, gates, token_counts)
    result = {"train": summary, "adapter": str(out)}
    if eval_records:
        engine = TorchEngine(base.model, base.tokenizer, clusters)
        scores = evaluate(engine, eval_records, config.seq_len, config.max_new_tokens, report_progress=True)
        if config.early_stopping:
            scores = {**scores, "best_step": summary["best_step"], "stopped_early": summary["stopped_early"]}
        atomic_write_text(out / EVAL_RESULTS, json.dumps(scores, indent=2) + "\n")
        result["eval"] = scores
    return result
