"""ONNX export at rounded precisions and on other devices, and the validation rules that judge it."""

import json

import pytest
from cli_helpers import run_cli

from hydra_edge.errors import UserError


@pytest.mark.parametrize(
    "precision,mode", [("int4", "adapters"), ("int4", "dynamic"), ("fp16", "adapters"), ("fp16", "dynamic")]
)
def test_rounded_precisions_keep_lora_float_and_validate(trained_adapter, tmp_path, precision, mode):
    import numpy as np
    import onnx
    from onnx import TensorProto

    from hydra_edge.exporters.formats.onnx import export
    from hydra_edge.exporters.onnx_chat import OnnxChat

    out = tmp_path / precision
    manifest = export(trained_adapter, out, mode=mode, precision=precision, log=lambda m: None)
    assert manifest["precision"] == precision and "agreement" in manifest["validation"]["criteria"]
    for check in manifest["validation"]["checks"].values():
        assert check["decisive_positions"] > 0 and check["decisive_agreement"] >= 0.9
        assert check["relative_error"] <= (0.25 if precision == "int4" else 0.02)
    model_dir = out / "models" / ("base" if mode == "adapters" else "dynamic")
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    lora = [i for i in graph.initializer if ".lora_A." in i.name or ".hydra_" in i.name or ".lora_B." in i.name]
    assert lora
    if precision == "int4":
        bits = {
            node.name: next(a.i for a in node.attribute if a.name == "bits")
            for node in graph.node
            if node.op_type == "MatMulNBits"
        }
        assert 4 in bits.values()  # the base is int4 ...
        head = [b for name, b in bits.items() if name.startswith("/lm_head/MatMul")]  # "/lm_head/MatMul_Q8"
        assert head == [8]  # ... but for the LM head (llama.cpp's Q4_K_M mix, README: Export)
        assert not any(i.name.endswith(("_Q4", "_scales")) for i in lora)  # the adapters are not
    else:
        assert {i.data_type for i in graph.initializer if i.name.endswith(".weight")} == {TensorProto.FLOAT16}
        assert {i.data_type for i in lora} == {TensorProto.FLOAT16}
    chat = OnnxChat(out)
    cluster, answer = chat.answer([{"role": "user", "content": "What is the capital of Peru?"}], 8)
    assert isinstance(cluster, int) and answer
    if mode == "adapters":  # the adapter files hold the graph's float type
        assert {v.dtype for v in chat._adapter_params(cluster).values()} == {
            np.dtype(np.float16 if precision == "fp16" else np.float32)
        }


def test_cuda_export_needs_a_cuda_runtime(trained_adapter, tmp_path, monkeypatch):
    import onnxruntime as ort

    from hydra_edge.exporters import runtime

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA runtime; benchmarks/gpu_export.sh checks the CUDA path")
    result = run_cli("export", "--adapter", str(trained_adapter), "--out", str(tmp_path / "gpu"), "--device", "cuda")
    assert result.returncode == 2 and "--device cuda" in result.stderr and "export-cuda" in result.stderr
    assert not (tmp_path / "gpu").exists()

    # onnxruntime and onnxruntime-gpu side by side overwrite each other's files: refused by name.
    monkeypatch.setattr("importlib.metadata.version", lambda dist: "1.32.0")
    with pytest.raises(UserError, match="both onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0"):
        runtime.check_runtime("cpu")


def test_cpu_and_gpu_extras_never_install_both_runtimes():
    import re
    from pathlib import Path

    import tomllib

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        found = set()
        for requirement in extras[extra]:
            name = re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0]
            if name == "hydra-edge":  # a self-reference such as hydra-edge[export,ui]
                for inner in requirement[requirement.index("[") + 1 : requirement.index("]")].split(","):
                    found |= names(inner)
            else:
                found.add(name)
        return found

    assert {"onnxruntime", "onnxruntime-genai"} <= names("export")
    assert "onnxruntime-genai-cuda" in names("export-cuda")
    assert not names("export-cuda") & {"onnxruntime", "onnxruntime-genai"}
    assert not names("ui") & {"onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda"}
    assert {"gradio", "onnxruntime", "pytest"} <= names("dev")


def test_validation_rejects_a_wrong_model():
    import numpy as np

    from hydra_edge.exporters.validation import compare_logits, validation_problem

    rng = np.random.default_rng(0)
    expected = rng.normal(size=(40, 64))
    assert validation_problem(compare_logits(expected + 1e-5, expected), "fp32") is None
    assert "tolerance" in validation_problem(compare_logits(expected + 0.01, expected), "fp32")
    assert (
        validation_problem(compare_logits(expected + rng.normal(scale=0.1, size=expected.shape), expected), "int4")
        is None
    )
    assert "logit error" in validation_problem(compare_logits(rng.normal(size=(40, 64)), expected), "int4")

    # Flat logits (a random-weight base): near-ties flip under small noise; that is not an error.
    flat = rng.normal(scale=0.01, size=(40, 64))
    flat_check = compare_logits(flat + rng.normal(scale=0.002, size=flat.shape), flat)
    assert flat_check["top1_agreement"] < 0.9 and validation_problem(flat_check, "int4") is None

    # A decisive top-1 that changes is an error even when the mean error stays small.
    peaked = expected.copy()
    rows = np.arange(40)
    peaked[rows, peaked.argmax(-1)] += 5.0  # every position clearly prefers one token
    wrong = peaked + rng.normal(scale=0.05, size=peaked.shape)
    wrong[rows[:8], peaked[:8].argmax(-1)] -= 10.0  # ...and 8 of 40 positions lose it
    check = compare_logits(wrong, peaked)
    assert check["relative_error"] < 0.25 and check["decisive_positions"] == 40
    assert "decisive" in validation_problem(check, "int4")


def test_rounded_precisions_cannot_pass_on_zero_decisive_positions():
    """Gemma 3 270M in int4: no position was decisive, and the old rule passed vacuously."""
    from hydra_edge.exporters.validation import validation_problem

    gemma_int4 = {
        "positions": 120,
        "decisive_positions": 0,
        "decisive_agreement": 1.0,
        "top1_agreement": 0.31,
        "relative_error": 0.084,
        "max_abs_logit_diff": 27.6,
    }
    problem = validation_problem(gemma_int4, "int4")
    assert problem and "0 of 120 positions are decisive" in problem and "export fp32 or fp16" in problem
    assert validation_problem({**gemma_int4, "top1_agreement": 0.9}, "int4") is None  # flat but faithful
    assert validation_problem({**gemma_int4, "top1_agreement": 0.7}, "fp16")  # fp16 is held tighter
    demo_int4 = {
        "positions": 120,
        "decisive_positions": 63,
        "decisive_agreement": 1.0,
        "top1_agreement": 0.55,
        "relative_error": 0.137,
        "max_abs_logit_diff": 3.9,
    }
    assert validation_problem(demo_int4, "int4") is None  # enough decisive positions: judged there
    assert validation_problem({**demo_int4, "decisive_agreement": 0.8}, "int4")


@pytest.mark.parametrize(
    "run_config, expected",
    [
        ({"model": "gemma3-270m", "data": [], "eval_data": None}, "demo"),  # a preset on the demo data
        ({"model": "tiny", "data": [], "eval_data": None}, "demo"),
        ({"model": "gemma3-270m", "data": ["mine.jsonl"], "eval_data": None}, "generic"),  # own data, no held-out rows
        ({"model": "some/model", "data": [], "eval_data": None}, "generic"),
    ],
)
def test_validation_prompts_are_the_rows_the_run_was_scored_on(tmp_path, run_config, expected):
    from hydra_edge.data.records import read_records
    from hydra_edge.exporters.validation import VALIDATION_PROMPTS, validation_prompts
    from hydra_edge.models.tiny import DEMO_EVAL

    (tmp_path / "run_config.json").write_text(json.dumps(run_config))
    prompts = validation_prompts(tmp_path)
    demo = [r.messages for r in read_records(str(DEMO_EVAL))][:VALIDATION_PROMPTS]
    assert (prompts == demo) == (expected == "demo")
    if expected == "demo":  # whole conversations: the answer positions are validated too
        assert all(p[-1]["role"] == "assistant" for p in prompts)
