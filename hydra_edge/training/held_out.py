"""The held-out set during training (--eval-every, --early-stopping).

Every N steps the model in training is scored as `hydra-edge eval` scores a finished adapter:
loss and per-cluster loss on every held-out row, exact-match on the first --eval-em-rows, plus
the router's health per module and its summary over modules (hydra_edge/adapter/gates.py), from which
the loop tells whether the heads have collapsed (heads_collapsed). Early stopping watches the
held-out loss and keeps the best step's adapter weights in <out>/best/, which become the run's
result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra_edge.adapter.inject import adapter_state_dict, load_adapter_state_dict
from hydra_edge.data.records import Record, tokenize_record
from hydra_edge.files import atomic_write_text, save_tensors

BEST_DIR = "best"
# A mean pairwise head cosine above this, past warmup, is reported as collapsed heads.
COLLAPSED_HEAD_COSINE = 0.9
# router_summary entries the trackers get as router/<name> (head_share is a list).
SUMMARY_TRACKED = ("routing_spread", "head_cosine", "max_head_share")


@dataclass
class HeldOut:
    """What an --eval-every pass needs: the rows, how to route them, and how much to score."""

    records: list[Record]
    tokenizer: object
    clusters: object  # clusters.fit.ClusterModel: routes each row as serving would
    seq_len: int
    max_new_tokens: int
    em_rows: int
    every: int

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def score(self, model) -> dict:
        """The eval row for metrics.jsonl (without its step): loss, perplexity, exact-match,
        per-cluster loss, the router's health per module and its summary over modules. Leaves
        the model in training mode."""
        from hydra_edge.adapter.gates import router_health, router_summary
        from hydra_edge.inference.evaluate import evaluate
        from hydra_edge.inference.torch_engine import TorchEngine

        started = time.perf_counter()
        try:
            engine = TorchEngine(model, self.tokenizer, self.clusters)
            scores = evaluate(engine, self.records, self.seq_len, self.max_new_tokens, em_rows=self.em_rows)
            samples = self._routed_samples()
            health = router_health(model, samples, self.tokenizer.pad_token_id)
        finally:
            model.train()
        return {
            "kind": "eval",
            "eval_loss": scores["loss"],
            "eval_perplexity": scores["perplexity"],
            "eval_exact_match": scores["exact_match"],
            "eval_em_rows": min(self.em_rows, scores["n"]),
            "eval_cluster_loss": {c: v["loss"] for c, v in scores["per_cluster"].items()},
            "router": health,
            "router_summary": router_summary(health),
            "eval_seconds": time.perf_counter() - started,
        }

    def _routed_samples(self) -> list:
        """The rows tokenized, each with the cluster serving routes it to (what the routing
        spread compares), as evaluate() routes them."""
        clusters = self.clusters.assign([r.prompt_text for r in self.records]) if self.records else []
        samples = [tokenize_record(self.tokenizer, r, self.seq_len) for r in self.records]
        for sample, cluster in zip(samples, clusters):
            sample.cluster = int(cluster)
        return samples


def heads_collapsed(row: dict, warmup_steps: int) -> bool:
    """Whether an eval row (with its step) shows heads that trained alike: past warmup (zero
    heads move together at first), a mean head cosine above COLLAPSED_HEAD_COSINE. HydraLoRA
    then trains as one LoRA at N times the cost; one head has no cosine and never collapses."""
    cosine = (row.get("router_summary") or {}).get("head_cosine")
    return cosine is not None and cosine > COLLAPSED_HEAD_COSINE and row["step"] > warmup_steps


def tracker_values(row: dict) -> dict:
    """An eval row as flat tracker metrics: eval/loss, eval/loss_cluster_<c>, the summary as
    router/routing_spread, router/head_cosine, router/max_head_share, and per module
    router/<module>/{gate_entropy, head_cosine, routing_spread, head_<i>_share}. None is left out."""
    values = {f"eval/{k.removeprefix('eval_')}": row[k] for k in ("eval_loss", "eval_perplexity", "eval_exact_match")}
    values.update({f"eval/loss_cluster_{c}": loss for c, loss in row["eval_cluster_loss"].items()})
    summary = row.get("router_summary") or {}
    values.update({f"router/{k}": summary.get(k) for k in SUMMARY_TRACKED})
    for module, health in row["router"].items():
        for key in ("gate_entropy", "head_cosine", "routing_spread"):
            values[f"router/{module}/{key}"] = health.get(key)
        values.update({f"router/{module}/head_{i}_share": s for i, s in enumerate(health["head_share"])})
    return {k: v for k, v in values.items() if v is not None}


@dataclass
class EarlyStopping:
    """Held-out loss watched across evals; a checkpoint's trainer state carries it, so a resumed
    run stops where the uninterrupted one would."""

    patience: int | None
    best_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    history: list = field(default_factory=list)  # [step, loss] per eval

    def update(self, step: int, loss: float | None) -> bool:
        """Records an eval; True when it is the best so far."""
        self.history.append([step, loss])
        if loss is not None and math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, patience: int | None, state: dict | None) -> EarlyStopping:
        if not state:
            return cls(patience)
        return cls(patience, state["best_loss"], state["best_step"], state["evals_since_best"], state["history"])


def save_best(out_dir: Path, model, step: int, loss: float) -> None:
    """The adapter weights of the best step so far, written atomically to <out>/best/."""
    folder = Path(out_dir) / BEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(adapter_state_dict(model), folder / "adapter_model.safetensors")
    atomic_write_text(folder / "best.json", json.dumps({"step": step, "eval_loss": loss}) + "\n")


def restore_best(out_dir: Path, model) -> int:
    """Loads the best step's weights into the model; returns that step."""
    from safetensors.torch import load_file

    folder = Path(out_dir) / BEST_DIR
    load_adapter_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), str(folder))
    return json.loads((folder / "best.json").read_text())["step"]
