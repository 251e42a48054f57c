"""Acceptance on the embedded demo: what the per-cluster exports keep of the trained model.

The demo run (`hydra-edge finetune`, no arguments) is scored with its per-token router in
PyTorch (eval_results.json); its `adapters` export serves one merged LoRA per routed cluster.
"""

import json

import pytest

pytestmark = pytest.mark.slow  # trains, exports or drives a browser


@pytest.fixture(scope="module")
def demo_scores(demo_run, tmp_path_factory):
    from hydra_edge.data.records import read_records
    from hydra_edge.exporters.formats.onnx import export
    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.inference.evaluate import evaluate
    from hydra_edge.models.tiny import DEMO_EVAL

    adapter, _ = demo_run
    records = read_records(DEMO_EVAL)
    scores = {"dynamic pytorch": json.loads((adapter / "eval_results.json").read_text())["exact_match"]}
    for precision in ("fp32", "int4"):
        out = tmp_path_factory.mktemp(f"demo-{precision}") / "onnx"
        export(adapter, out, mode="adapters", precision=precision, log=lambda m: None)
        scores[precision] = evaluate(OnnxChat(out), records, seq_len=128, max_new_tokens=32)["exact_match"]
    return scores


def test_adapters_export_keeps_95_percent_of_the_dynamic_models_exact_match(demo_scores):
    assert demo_scores["dynamic pytorch"] >= 0.7, demo_scores
    assert demo_scores["fp32"] >= 0.95 * demo_scores["dynamic pytorch"], demo_scores


def test_int4_loses_at_most_two_points(demo_scores):
    assert demo_scores["int4"] >= demo_scores["fp32"] - 0.02, demo_scores
