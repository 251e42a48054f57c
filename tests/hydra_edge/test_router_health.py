"""Router health during training: the numbers (head cosine, routing spread, the summary), what
the trackers get, the eval line, and the one-line warning when the heads have collapsed."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hydra_edge.adapter.gates import head_cosine, router_health, router_summary, routing_spread
from hydra_edge.adapter.layer import HydraLoRALinear
from hydra_edge.data.records import IGNORE_INDEX, Record, Sample
from hydra_edge.training.config import FinetuneConfig
from hydra_edge.training.held_out import EarlyStopping, HeldOut, heads_collapsed, tracker_values
from hydra_edge.training.loop import train_loop
from hydra_edge.training.progress_bar import collapse_warning, eval_line
from hydra_edge.training.step_plan import StepPlan

DIM, OUT, R = 4, 6, 2
PAD = 0
# Token 1 points along e0 (cluster 0's tokens), token 2 along e1 (cluster 1's), the pad token
# along e1 too: padding counted as cluster 0's would pull its gates toward head 1.
EMBEDDINGS = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


class TinyLM(nn.Module):
    """Embedding -> one HydraLoRA layer -> a fixed head: enough for the gate pass and a few steps."""

    _hydra_deferred_head_ok = False  # lm_head.mean_label_loss: use model(**batch).loss

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(EMBEDDINGS.clone())
        self.proj = HydraLoRALinear(nn.Linear(DIM, OUT), rank=R, alpha=2, heads=heads)
        self.head = nn.Linear(OUT, len(EMBEDDINGS))
        self.head.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=None, logits_to_keep=None, **_):
        logits = self.head(self.proj(self.embed(input_ids)))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return SimpleNamespace(logits=logits, loss=loss)


def sample(ids: list[int], cluster: int) -> Sample:
    return Sample(ids, list(ids), None, cluster=cluster)


def cluster_samples() -> list[Sample]:
    """Cluster 0: short rows of token 1 (padded); cluster 1: longer rows of token 2."""
    return [sample([1, 1], 0), sample([2, 2, 2, 2], 1), sample([1], 0), sample([2, 2, 2], 1)]


def set_router(model: TinyLM, rows: list[list[float]]) -> None:
    with torch.no_grad():
        model.proj.hydra_router.copy_(torch.tensor(rows))  # (N, in)


def test_identical_heads_have_cosine_one_and_opposite_ones_minus_one():
    head = torch.randn(OUT, R)
    assert head_cosine(head.expand(3, OUT, R)) == pytest.approx(1.0)
    assert head_cosine(torch.stack([head, -head])) == pytest.approx(-1.0)
    assert head_cosine(torch.randn(1, OUT, R)) is None  # one head: nothing to compare
    orthogonal = torch.zeros(2, OUT, R)
    orthogonal[0, 0, 0], orthogonal[1, 1, 1] = 1.0, 2.0
    assert head_cosine(orthogonal) == pytest.approx(0.0)


def test_routing_spread_is_the_mean_total_variation_from_the_mean_mix():
    assert routing_spread(torch.tensor([[0.5, 0.5], [0.5, 0.5]])) == 0.0
    assert routing_spread(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5)
    # means (0.9, 0.1), (0.5, 0.5), (0.1, 0.9): overall (0.5, 0.5); total variation 0.4, 0, 0.4
    assert routing_spread(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])) == pytest.approx(0.8 / 3)
    assert routing_spread(torch.tensor([[0.3, 0.7]])) is None  # one cluster


def test_router_health_on_a_hand_built_model():
    torch.manual_seed(0)
    model = TinyLM(heads=2)
    with torch.no_grad():
        model.proj.hydra_B.copy_(torch.randn(OUT, R).expand(2, OUT, R))  # identical heads
    set_router(model, [[8.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0]])  # cluster 0 -> head 0, cluster 1 -> head 1
    samples = cluster_samples()
    (health,) = router_health(model, samples, PAD, batch_size=3).values()  # batches cross clusters
    assert health["head_cosine"] == pytest.approx(1.0)
    g = torch.softmax(torch.tensor([8.0, 0.0]), dim=0)  # every real token's gates, up to the head order
    expected = float(0.5 * (g - g.flip(0)).abs().sum() / 2)  # each cluster's distance to the mean mix
    assert health["routing_spread"] == pytest.approx(expected) and health["routing_spread"] > 0.4
    assert health["head_share"] == pytest.approx([3 / 10, 7 / 10])  # 3 real tokens of cluster 0, 7 of cluster 1
    assert 0 < health["gate_entropy"] < 0.1

    set_router(model, [[0.0] * DIM, [0.0] * DIM])  # uniform gates: every cluster gets the same mix
    (uniform,) = router_health(model, samples, PAD).values()
    assert uniform["routing_spread"] == pytest.approx(0.0) and uniform["gate_entropy"] == pytest.approx(1.0)

    one_cluster = [sample([1, 2], 0), sample([2, 1, 1], 0)]
    assert next(iter(router_health(model, one_cluster, PAD).values()))["routing_spread"] is None
    (lone,) = router_health(TinyLM(heads=1), samples, PAD).values()
    assert lone["head_cosine"] is None and lone["head_share"] == [1.0]


class CharTokenizer:
    """'a' -> token 1, anything else -> token 2 (also the end of text); no BOS."""

    eos_token_id, bos_token_id, pad_token_id = 2, None, PAD

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [1 if ch == "a" else 2 for ch in text]}


class FirstLetterClusters:
    """Routes a prompt by its first letter, as a fitted ClusterModel routes by its features."""

    def assign(self, texts: list[str]) -> np.ndarray:
        return np.array([0 if t.startswith("a") else 1 for t in texts])


def test_held_out_rows_carry_the_cluster_serving_routes_them_to():
    records = [Record("f:1", text="aaa"), Record("f:2", text="bbbb"), Record("f:3", text="ab")]
    held_out = HeldOut(records, CharTokenizer(), FirstLetterClusters(), seq_len=16, max_new_tokens=4, em_rows=0,
                       every=1)  # fmt: skip
    samples = held_out._routed_samples()
    assert [s.cluster for s in samples] == [0, 1, 0] and samples[1].input_ids == [2, 2, 2, 2]
    model = TinyLM(heads=2)
    set_router(model, [[8.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0]])
    (health,) = router_health(model, samples, PAD).values()
    assert health["routing_spread"] > 0.2  # two clusters, routed apart
    assert HeldOut([], CharTokenizer(), FirstLetterClusters(), 16, 4, 0, 1)._routed_samples() == []


def test_router_summary_averages_over_modules_and_skips_none():
    health = {
        "a": {"gate_entropy": 0.5, "head_share": [0.75, 0.25], "head_cosine": 0.9, "routing_spread": 0.1},
        "b": {"gate_entropy": 0.7, "head_share": [0.25, 0.75], "head_cosine": 0.5, "routing_spread": None},
    }
    summary = router_summary(health)
    assert summary["head_cosine"] == pytest.approx(0.7) and summary["routing_spread"] == pytest.approx(0.1)
    assert summary["max_head_share"] == pytest.approx(0.75) and summary["head_share"] == pytest.approx([0.5, 0.5])
    assert router_summary({"a": {**health["a"], "head_cosine": None}})["head_cosine"] is None
    assert router_summary({}) == {"routing_spread": None, "head_cosine": None, "max_head_share": None, "head_share": []}


def eval_row(step: int = 120, cosine: float | None = 0.94, spread: float | None = 0.004) -> dict:
    health = {
        "m.up": {"gate_entropy": 0.9, "head_share": [0.6, 0.4], "head_cosine": cosine, "routing_spread": spread},
    }
    return {
        "step": step,
        "kind": "eval",
        "eval_loss": 1.25,
        "eval_perplexity": math.exp(1.25),
        "eval_exact_match": 0.5,
        "eval_em_rows": 8,
        "eval_cluster_loss": {"0": 1.0, "1": 1.5},
        "router": health,
        "router_summary": router_summary(health),
    }


def test_tracker_values_carry_the_summary_and_per_module_health():
    values = tracker_values(eval_row())
    assert values["router/routing_spread"] == pytest.approx(0.004)
    assert values["router/head_cosine"] == pytest.approx(0.94)
    assert values["router/max_head_share"] == pytest.approx(0.6)
    assert values["router/m.up/head_cosine"] == pytest.approx(0.94)
    assert values["router/m.up/routing_spread"] == pytest.approx(0.004)
    assert {"router/m.up/gate_entropy", "router/m.up/head_0_share", "router/m.up/head_1_share"} <= set(values)
    assert all(isinstance(v, (int, float)) for v in values.values())  # no lists, no None

    lone = tracker_values(eval_row(cosine=None, spread=None))  # one head, one cluster
    assert not any(key.endswith(("head_cosine", "routing_spread")) for key in lone)
    old = {**eval_row(), "router": {}}  # a row without a summary (scripted in tests, or older code)
    del old["router_summary"]
    assert not any(key.startswith("router/") for key in tracker_values(old))


def test_eval_line_adds_routing_spread_and_head_cosine():
    stopping = EarlyStopping(None)
    stopping.update(120, 1.25)
    line = eval_line(eval_row(), stopping)
    assert line == (
        "eval: step 120 held-out loss 1.2500, exact-match 50.0 % of 8, best step 120, "
        "routing spread 0.004, head cosine 0.94"
    )
    assert eval_line(eval_row(cosine=None, spread=None), stopping).endswith("best step 120")
    bare = {k: v for k, v in eval_row().items() if k != "router_summary"}
    assert eval_line(bare, EarlyStopping(None)) == "eval: step 120 held-out loss 1.2500, exact-match 50.0 % of 8"


@pytest.mark.parametrize(
    "step, cosine, collapsed",
    [
        (120, 0.94, True),
        (10, 0.94, False),  # still in warmup: zero heads start out moving together
        (20, 0.94, False),  # the last warmup step
        (21, 0.94, True),
        (120, 0.90, False),  # not above the threshold
        (120, 0.3, False),
        (120, None, False),  # one head
    ],
)
def test_heads_collapsed_past_warmup_above_the_threshold(step, cosine, collapsed):
    assert heads_collapsed(eval_row(step, cosine), warmup_steps=20) is collapsed


def test_heads_collapsed_needs_a_summary():
    bare = {k: v for k, v in eval_row().items() if k != "router_summary"}
    assert heads_collapsed(bare, warmup_steps=0) is False


def test_collapse_warning_is_one_line_with_the_cure():
    line = collapse_warning(eval_row())
    assert "\n" not in line and line.startswith("warning: the heads have collapsed")
    assert "mean head cosine 0.94 > 0.9 at step 120" in line and "one LoRA" in line
    assert "--head-init random --head-dropout 0.1 --router-temperature 0.1 --router-loss 0.1" in line


class ScriptedHeldOut:
    """A held-out set whose router health is scripted: identical heads at every eval."""

    every = 2

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0

    def score(self, model) -> dict:
        """The eval row without its step (the loop adds it), as HeldOut.score returns it."""
        row = {k: v for k, v in eval_row().items() if k != "step"}
        health = {"m.up": {**row["router"]["m.up"], "head_cosine": 0.99}}
        return {**row, "router": health, "router_summary": router_summary(health)}


def test_the_loop_writes_the_warning_to_the_eval_row_and_the_bar(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyLM(heads=2)
    samples = [sample([1, 1, 2, 1], 0), sample([2, 2, 1, 2], 1)] * 2
    config = FinetuneConfig(
        batch_size=2, grad_accum=1, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0, seed=0, save_every=0,
        max_bad_steps=3, pooled_steps=0.0,
    )  # fmt: skip
    plan = StepPlan(total_steps=4, warmup_steps=2)
    train_loop(model, samples, config, plan, tmp_path, PAD, "no", held_out=ScriptedHeldOut())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [(r["step"], r["heads_collapsed"]) for r in evals] == [(2, False), (4, True)]  # warmup: 2 steps
    assert evals[-1]["router_summary"]["head_cosine"] == pytest.approx(0.99)
    err = capsys.readouterr().err
    assert "eval: step 4 held-out loss 1.2500" in err and "routing spread 0.004, head cosine 0.99" in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: the heads have collapsed")]
    assert len(warnings) == 1 and "at step 4" in warnings[0]
