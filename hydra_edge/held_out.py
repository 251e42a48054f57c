"""The held-out set during training (--eval-every, --early-stopping).

Every N steps the model in training is scored as `hydra-edge eval` scores a finished adapter:
loss and per-cluster loss on every held-out row, exact-match on the first --eval-em-rows, plus
the router's health per module (hydra_edge/gates.py). Early stopping watches the held-out loss
and keeps the best step's adapter weights in <out>/best/, which become the run's result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra_edge.adapter import adapter_state_dict, load_adapter_state_dict
from hydra_edge.data import Record, tokenize_record
from hydra_edge.files import atomic_write_text, save_tensors

BEST_DIR = "best"


@dataclass
class HeldOut:
    """What an --eval-every pass needs: the rows, how to route them, and how much to score."""

    records: list[Record]
    tokenizer: object
    clusters: object  # clustering.ClusterModel: routes each row as serving would
    seq_len: int
    max_new_tokens: int
    em_rows: int
    every: int

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def score(self, model) -> dict:
        """The eval row for metrics.jsonl (without its step): loss, perplexity, exact-match,
        per-cluster loss and the router's health. Leaves the model in training mode."""
        from hydra_edge.evaluate import evaluate
        from hydra_edge.gates import router_health
        from hydra_edge.torch_engine import TorchEngine

        started = time.perf_counter()
        try:
            engine = TorchEngine(model, self.tokenizer, self.clusters)
            scores = evaluate(engine, self.records, self.seq_len, self.max_new_tokens, em_rows=self.em_rows)
            samples = [tokenize_record(self.tokenizer, r, self.seq_len) for r in self.records]
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
            "eval_seconds": time.perf_counter() - started,
        }


def tracker_values(row: dict) -> dict:
    """An eval row as flat tracker metrics: eval/loss, eval/loss_cluster_<c>,
    router/<module>/gate_entropy, router/<module>/head_<i>_share."""
    values = {f"eval/{k.removeprefix('eval_')}": row[k] for k in ("eval_loss", "eval_perplexity", "eval_exact_match")}
    values.update({f"eval/loss_cluster_{c}": loss for c, loss in row["eval_cluster_loss"].items()})
    for module, health in row["router"].items():
        values[f"router/{module}/gate_entropy"] = health["gate_entropy"]
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
