"""ONNX export (adapters, merged, dynamic): validated logits, same greedy tokens as PyTorch, tamper checks."""

import json
import shutil

import pytest
from cli_helpers import conversation_routed_by_its_system_prompt, run_cli

from hydra_edge.errors import UserError


@pytest.fixture(scope="module", params=["adapters", "merged", "dynamic"])
def exported(request, trained_adapter, tmp_path_factory):
    from hydra_edge.exporters.onnx_export import export

    out = tmp_path_factory.mktemp(f"export-{request.param}") / "onnx"
    manifest = export(trained_adapter, out, mode=request.param, log=lambda m: None)
    return out, manifest


def model_dirs(out, manifest):
    if manifest["mode"] in ("adapters", "dynamic"):
        return [out / "models" / ("base" if manifest["mode"] == "adapters" else "dynamic")]
    return [out / "models" / f"cluster_{c}" for c in manifest["clusters"]]


def test_export_layout_and_validation(exported, trained_adapter):
    out, manifest = exported
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["base"]["weights"] == "dequantized nf4"
    assert len(manifest["clusters"]) == config["heads"]
    assert all((d / "model.onnx").is_file() for d in model_dirs(out, manifest))
    assert "serve-vllm.sh" in manifest["files"] and "cluster_0=peft/cluster_0" in (out / "serve-vllm.sh").read_text()
    for cluster in manifest["clusters"]:
        assert (out / "peft" / f"cluster_{cluster}" / "adapter_model.safetensors").is_file()
        if manifest["mode"] == "adapters":
            assert (out / "adapters" / f"cluster_{cluster}.onnx_adapter").is_file()
    checks = manifest["validation"]["checks"]
    expected = ["dynamic"] if manifest["mode"] == "dynamic" else [str(c) for c in manifest["clusters"]]
    assert sorted(checks) == sorted(expected)
    assert all(check["max_abs_logit_diff"] <= 1e-3 for check in checks.values())
    assert manifest["validation"]["onnx_checker"] == "passed"
    assert (out / "router" / "clusters.safetensors").is_file()
    assert not list(out.parent.glob(".export-*"))  # the work folder was renamed into place


def test_onnx_greedy_tokens_equal_pytorch_on_every_demo_prompt(exported, trained_adapter):
    import torch  # noqa: F401

    from hydra_edge.data import read_records
    from hydra_edge.engines import Engine
    from hydra_edge.exporters.merge import hydra_on_plain_base
    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.gates import cluster_gates
    from hydra_edge.inference import generate_greedy
    from hydra_edge.switches import fixed_gates
    from hydra_edge.tiny import DEMO_EVAL

    out, _ = exported
    chat = OnnxChat(out)
    assert isinstance(chat, Engine)
    gates = cluster_gates(trained_adapter)
    conversations = [r.messages[:-1] for r in read_records(DEMO_EVAL)]
    by_cluster: dict[int, list[int]] = {}
    for i, conv in enumerate(conversations):
        by_cluster.setdefault(chat.route(conv), []).append(i)
    assert len(by_cluster) >= 2
    dynamic = chat.manifest["mode"] == "dynamic"  # the router and all heads run per token, as in training
    for cluster, rows in by_cluster.items():
        model, tokenizer = hydra_on_plain_base(out / "peft" / "base", trained_adapter)
        with fixed_gates(model, None if dynamic else gates[cluster]):
            expected = generate_greedy(model, tokenizer, [conversations[i] for i in rows], max_new_tokens=32)
        for i, reference in zip(rows, expected):
            routed, answer = chat.answer(conversations[i], max_new_tokens=32)
            assert routed == cluster and answer == reference, (conversations[i], answer, reference)


def test_tampered_exports_are_refused(exported, tmp_path):
    from hydra_edge.exporters.manifest import verify_export

    out, manifest = exported
    model_dir = model_dirs(out, manifest)[0].name
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    verify_export(copy)
    data = copy / "models" / model_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="changed since export"):
        verify_export(copy)

    import onnx

    escaped = tmp_path / "escaped"
    shutil.copytree(out, escaped)
    model_file = escaped / "models" / model_dir / "model.onnx"
    graph = onnx.load(str(model_file), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../outside.data"
    onnx.save(graph, str(model_file))
    manifest_path = escaped / "export_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from hydra_edge.files import sha256_of

    manifest["files"][f"models/{model_dir}/model.onnx"] = sha256_of(model_file)  # a consistent-looking manifest
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="outside .*refusing"):
        verify_export(escaped)


def _forge(copy, rel: str) -> None:
    """Lists `rel` in the manifest with its current digest: a consistent-looking manifest."""
    from hydra_edge.files import sha256_of

    manifest_path = copy / "export_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][rel] = sha256_of(copy / rel)
    manifest_path.write_text(json.dumps(manifest))


def _external_onnx(path, location: str) -> None:
    """A one-node ONNX model whose weight lives in an external file at `location`."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize(
    "forgery",
    [
        "unlisted file",
        "decoder outside",
        "decoder not listed",
        "other onnx reads outside",
        "symlink",
        "missing model or adapter",
    ],
)
def test_verify_export_accounts_for_every_file(exported, tmp_path, forgery):
    from hydra_edge.exporters.manifest import verify_export

    out, manifest = exported
    model_dir = model_dirs(out, manifest)[0].relative_to(out).as_posix()
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config_rel = f"{model_dir}/genai_config.json"
    if forgery == "unlisted file":
        (copy / model_dir / "notes.txt").write_text("not part of the export")
        match = "notes.txt is not in export_manifest.json"
    elif forgery.startswith("decoder"):
        config = json.loads((copy / config_rel).read_text())
        config["model"]["decoder"]["filename"] = (
            "../../../outside.onnx" if forgery == "decoder outside" else "other.onnx"
        )
        (copy / config_rel).write_text(json.dumps(config))
        _forge(copy, config_rel)
        match = (
            "outside .*refusing" if forgery == "decoder outside" else "'other.onnx', which the manifest does not list"
        )
    elif forgery == "other onnx reads outside":
        _external_onnx(copy / model_dir / "extra.onnx", "../../../../outside.data")
        _forge(copy, f"{model_dir}/extra.onnx")
        match = "outside .*refusing"
    elif forgery == "symlink":
        (copy / "router" / "link.json").symlink_to(tmp_path)
        match = "is a link"
    else:
        first = manifest["clusters"][0]
        victim = {
            "adapters": f"adapters/cluster_{first}.onnx_adapter",
            "merged": f"models/cluster_{first}/model.onnx",
            "dynamic": "models/dynamic/genai_config.json",
        }[manifest["mode"]]
        (copy / victim).unlink()
        forged = json.loads((copy / "export_manifest.json").read_text())
        del forged["files"][victim]
        (copy / "export_manifest.json").write_text(json.dumps(forged))
        match = f"{victim} is missing from the export"
    with pytest.raises(UserError, match=match):
        verify_export(copy)


def test_onnx_checker_runs_on_every_export_and_rejects_a_broken_graph(exported, tmp_path):
    import onnx

    from hydra_edge.exporters.runtime import check_onnx_model

    out, manifest = exported
    for model_dir in model_dirs(out, manifest):
        check_onnx_model(model_dir)  # what export ran before writing "onnx_checker": "passed"
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs(out, manifest)[0], broken)
    graph = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    del graph.graph.node[len(graph.graph.node) // 2]  # a node whose output others still read
    onnx.save(graph, str(broken / "model.onnx"))
    with pytest.raises(UserError, match="onnx.checker rejects"):
        check_onnx_model(broken)
    assert not (broken / ".checker-probe.onnx").exists()


def test_export_cli_errors(trained_adapter, exported, tmp_path):
    out, _ = exported
    result = run_cli("export", "--adapter", str(trained_adapter), "--out", str(out))
    assert result.returncode == 2 and "not empty" in result.stderr.splitlines()[-1]
    result = run_cli("export", "--adapter", str(trained_adapter), "--out", str(tmp_path / "x"), "--mode", "sideways")
    assert result.returncode == 2 and "--mode sideways" in result.stderr.splitlines()[-1]
    result = run_cli("export", "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_chat_and_eval_on_an_export_from_the_cli(exported, trained_adapter):
    from hydra_edge.tiny import DEMO_EVAL

    out, manifest = exported
    chat = run_cli("chat", "--onnx", str(out), "--prompt", "What is the capital of Peru?", "--max-new-tokens", "8")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip() and f"ONNX export ({manifest['mode']}, " in chat.stderr and "[cluster " in chat.stderr
    # With a system prompt the export routes like training and PyTorch chat: on the whole conversation.
    system, prompt, cluster = conversation_routed_by_its_system_prompt(trained_adapter)
    args = ["--system", system, "--prompt", prompt, "--max-new-tokens", "4"]
    onnx_chat, torch_chat = (
        run_cli("chat", "--onnx", str(out), *args),
        run_cli("chat", "--adapter", str(trained_adapter), *args),
    )
    assert f"[cluster {cluster} | ONNX export" in onnx_chat.stderr, onnx_chat.stderr[-500:]
    assert f"[cluster {cluster} | gates" in torch_chat.stderr, torch_chat.stderr[-500:]
    result = run_cli("eval", "--onnx", str(out), "--data", str(DEMO_EVAL), "--json", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout)
    assert set(scores) == {"loss", "perplexity", "exact_match", "n", "per_cluster"}
    assert scores["n"] == 79 and 0 < scores["loss"] < 20 and scores["exact_match"] is not None
    both = run_cli("chat", "--onnx", str(out), "--adapter", str(trained_adapter), "--prompt", "hi")
    assert both.returncode == 2 and "either --adapter" in both.stderr


@pytest.mark.parametrize(
    "precision,mode", [("int4", "adapters"), ("int4", "dynamic"), ("fp16", "adapters"), ("fp16", "dynamic")]
)
def test_rounded_precisions_keep_lora_float_and_validate(trained_adapter, tmp_path, precision, mode):
    import numpy as np
    import onnx
    from onnx import TensorProto

    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.exporters.onnx_export import export

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
    from hydra_edge.data import read_records
    from hydra_edge.exporters.validation import VALIDATION_PROMPTS, validation_prompts
    from hydra_edge.tiny import DEMO_EVAL

    (tmp_path / "run_config.json").write_text(json.dumps(run_config))
    prompts = validation_prompts(tmp_path)
    demo = [r.messages for r in read_records(str(DEMO_EVAL))][:VALIDATION_PROMPTS]
    assert (prompts == demo) == (expected == "demo")
    if expected == "demo":  # whole conversations: the answer positions are validated too
        assert all(p[-1]["role"] == "assistant" for p in prompts)


def test_an_engine_that_is_dropped_is_freed(adapter_export):
    """The web UI opens engines and drops all but the latest two: nothing may keep them alive."""
    import gc
    import weakref

    from hydra_edge.exporters.onnx_chat import OnnxChat

    engine = OnnxChat(adapter_export)
    assert engine.max_length(engine.route([{"role": "user", "content": "hi"}]), 8) >= 8
    engine.answer([{"role": "user", "content": "hi"}], max_new_tokens=2)
    alive = weakref.ref(engine)
    del engine
    gc.collect()
    assert alive() is None


def test_dynamic_export_routes_with_the_adapters_temperature_and_top_k(trained_adapter, tmp_path):
    """The router's temperature and top-k are part of the model: the dynamic ONNX graph applies
    them (export validation compares its logits with PyTorch's, which applies them too), and
    the answers equal PyTorch's."""
    from hydra_edge.data import read_records
    from hydra_edge.exporters.merge import hydra_on_plain_base
    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.exporters.onnx_export import export
    from hydra_edge.inference import generate_greedy
    from hydra_edge.tiny import DEMO_EVAL

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["heads"] == 3
    config_path.write_text(json.dumps({**config, "router_temperature": 0.25, "router_top_k": 2}))
    manifest = export(adapter, tmp_path / "onnx", mode="dynamic", log=lambda m: None)
    assert manifest["validation"]["checks"]["dynamic"]["max_abs_logit_diff"] <= 1e-3
    chat = OnnxChat(tmp_path / "onnx")
    model, tokenizer = hydra_on_plain_base(tmp_path / "onnx" / "peft" / "base", adapter)
    conversations = [r.messages[:-1] for r in read_records(DEMO_EVAL)][:6]
    expected = generate_greedy(model, tokenizer, conversations, max_new_tokens=24)
    assert [chat.answer(c, max_new_tokens=24)[1] for c in conversations] == expected
