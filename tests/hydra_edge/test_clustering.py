"""Clusters: k from the elbow, the demo's task families recovered, and a pickle-free round trip."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from hydra_edge.clusters.fit import elbow_k, fit_clusters, load_clusters, save_clusters
from hydra_edge.errors import UserError
from hydra_edge.models.tiny import DEMO_EVAL, DEMO_TRAIN
from hydra_edge.training.config import FinetuneConfig

MAX_K = FinetuneConfig().max_k  # what finetune --heads auto tries


def demo_rows(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [r["messages"][0]["content"] for r in rows], [r["task"] for r in rows]


@pytest.mark.parametrize(
    "curve, expected",
    [
        ({2: 100, 3: 40, 4: 35, 5: 33, 6: 32}, 3),
        ({2: 100, 3: 80, 4: 60, 5: 20, 6: 18, 7: 17}, 5),
    ],
)
def test_elbow_picks_the_knee(curve, expected):
    assert elbow_k(curve) == expected


def test_demo_families_are_recovered():
    texts, tasks = demo_rows(DEMO_TRAIN)
    model, labels = fit_clusters(texts, heads=None, max_k=MAX_K)
    assert 4 <= model.k <= 8
    # Every cluster is (nearly) one task family: clusters refine families, never mix them.
    for c in range(model.k):
        members = [t for t, label in zip(tasks, labels) if label == c]
        assert max(members.count(t) for t in set(members)) / len(members) >= 0.95
    assert adjusted_rand_score(tasks, labels) >= 0.6


def test_round_trip_assigns_held_out_rows_identically(tmp_path):
    texts, _ = demo_rows(DEMO_TRAIN)
    held, _ = demo_rows(DEMO_EVAL)
    model, labels = fit_clusters(texts, heads=4, max_k=MAX_K)
    save_clusters(model, tmp_path)
    loaded = load_clusters(tmp_path)
    assert np.array_equal(loaded.assign(texts), labels)
    assert np.array_equal(loaded.assign(held), model.assign(held))
    assert not list(tmp_path.glob("*.pkl"))


def test_scripts_without_spaces_cluster():
    weather = [
        "今天天气很好",
        "明天会下雨吗",
        "天气预报说明天晴天",
        "外面下雨了吗",
        "今天的天气怎么样",
        "明天天气冷吗",
        "下雨天要带伞",
        "天气预报说今天下雨",
    ]
    food = [
        "我想吃饺子",
        "这家餐厅的面条很好吃",
        "晚饭吃米饭",
        "饺子和面条哪个好吃",
        "早饭吃包子",
        "我们去吃面条吧",
        "包子和饺子都好吃",
        "午饭想吃米饭",
    ]
    model, labels = fit_clusters(weather + food, heads=2, max_k=MAX_K)
    assert adjusted_rand_score([0] * len(weather) + [1] * len(food), labels) == 1.0


def test_one_head_is_one_cluster_and_too_many_heads_refused():
    model, labels = fit_clusters(["a b", "c d", "e f"], heads=1, max_k=MAX_K)
    assert model.k == 1 and set(labels.tolist()) == {0}
    assert model.assign(["anything"]).tolist() == [0]
    with pytest.raises(UserError, match="--heads 5"):
        fit_clusters(["a", "b", "c"], heads=5, max_k=MAX_K)


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_mixed_language_fixture_clusters_by_language(tmp_path):
    from cli_helpers import run_cli

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "mixed_language.jsonl"
    languages = [json.loads(line)["language"] for line in fixture.read_text(encoding="utf-8").splitlines()]
    plot = tmp_path / "elbow.png"
    result = run_cli("clusters", "--data", str(fixture), "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert {"k", "sizes", "top_terms", "labels"} <= found.keys()
    assert len(found["labels"]) == len(languages) and sum(found["sizes"]) == len(languages)
    assert adjusted_rand_score(languages, found["labels"]) >= 0.8
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    text = run_cli("clusters", "--data", str(fixture))
    assert f"k={found['k']}" in text.stdout and "top terms" in text.stdout and "inertia" in text.stdout
