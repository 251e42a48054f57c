"""The exported request router routes exactly as the training-time featurizer does."""

import json
import sys
from pathlib import Path

import numpy as np

from hydra_edge.clusters.fit import fit_clusters, save_clusters
from hydra_edge.clusters.router import RequestRouter
from hydra_edge.models.tiny import DEMO_EVAL, DEMO_TRAIN
from hydra_edge.training.config import FinetuneConfig

MAX_K = FinetuneConfig().max_k  # what finetune --heads auto tries

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "mixed_language.jsonl"


def texts_of(path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["text"] if "text" in r else r["messages"][0]["content"] for r in rows]


def test_router_matches_training_featurizer(tmp_path):
    for train, extra in ((DEMO_TRAIN, DEMO_EVAL), (FIXTURE, FIXTURE)):
        texts = texts_of(train)
        model, labels = fit_clusters(texts, heads=None, max_k=MAX_K)
        save_clusters(model, tmp_path, labels)
        router = RequestRouter.from_dir(tmp_path)
        probe = texts + texts_of(extra) + ["", "Completely unseen words ÄÖÜ", "  spaced   out  "]
        np.testing.assert_allclose(router.features(probe), model.features(probe), atol=1e-9)
        assert np.array_equal(router.route(probe), model.assign(probe))


def test_router_needs_no_scikit_learn(tmp_path):
    import subprocess

    model, labels = fit_clusters(texts_of(DEMO_TRAIN), heads=None, max_k=MAX_K)
    save_clusters(model, tmp_path, labels)
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from hydra_edge.clusters.router import RequestRouter\n"
        f"print(RequestRouter.from_dir({str(tmp_path)!r}).route(['What is the capital of Peru?'])[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == int(model.assign(["What is the capital of Peru?"])[0])
