"""ONNX export (adapters, merged, dynamic): validated logits, same greedy tokens as PyTorch, tamper checks."""

import json
import shutil

import pytest
from cli_helpers import conversation_routed_by_its_system_prompt, run_cli

from hydra_edge.errors import UserError


@pytest.fixture(scope="module", params=["adapters", "merged", "dynamic"])
def exported(request, trained_adapter, tmp_path_factory):
    from hydra_edge.exporters.formats.onnx import export

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
    assert manifest["format"] == "onnx" and not any(f.startswith("peft/") for f in manifest["files"])
    assert "serve-vllm.sh" not in manifest["files"]  # PEFT folders and the vLLM script are --format peft / vllm
    for cluster in manifest["clusters"]:
        if manifest["mode"] == "adapters":
            assert (out / "adapters" / f"cluster_{cluster}.onnx_adapter").is_file()
    checks = manifest["validation"]["checks"]
    expected = ["dynamic"] if manifest["mode"] == "dynamic" else [str(c) for c in manifest["clusters"]]
    assert sorted(checks) == sorted(expected)
    assert all(check["max_abs_logit_diff"] <= 1e-3 for check in checks.values())
    assert manifest["validation"]["onnx_checker"] == "passed"
    assert (out / "router" / "clusters.safetensors").is_file()
    assert not list(out.parent.glob(".export-*"))  # the work folder was renamed into place


def test_onnx_greedy_tokens_equal_pytorch_on_every_demo_prompt(exported, trained_adapter, plain_base):
    import torch  # noqa: F401

    from hydra_edge.adapter.gates import cluster_gates
    from hydra_edge.adapter.switches import fixed_gates
    from hydra_edge.data.records import read_records
    from hydra_edge.exporters.merge import hydra_on_plain_base
    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.inference.protocol import Engine
    from hydra_edge.inference.trained import generate_greedy
    from hydra_edge.models.tiny import DEMO_EVAL

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
        model, tokenizer = hydra_on_plain_base(plain_base, trained_adapter)
        with fixed_gates(model, None if dynamic else gates[cluster]):
            expected = generate_greedy(model, tokenizer, [conversations[i] for i in rows], max_new_tokens=32)
        for i, reference in zip(rows, expected):
            routed, answer = chat.answer(conversations[i], max_new_tokens=32)
            assert routed == cluster and answer == reference, (conversations[i], answer, reference)


def test_tampered_exports_are_refused(exported, tmp_path):
    from hydra_edge.exporters.formats.onnx import verify_onnx_export

    out, manifest = exported
    model_dir = model_dirs(out, manifest)[0].name
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    verify_onnx_export(copy)
    data = copy / "models" / model_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="changed since export"):
        verify_onnx_export(copy)

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
        verify_onnx_export(escaped)


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
    from hydra_edge.exporters.formats.onnx import verify_onnx_export

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
        verify_onnx_export(copy)


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
    from hydra_edge.models.tiny import DEMO_EVAL

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
    assert both.returncode == 2 and "one of --adapter" in both.stderr


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


def test_dynamic_export_routes_with_the_adapters_temperature_and_top_k(trained_adapter, plain_base, tmp_path):
    """The router's temperature and top-k are part of the model: the dynamic ONNX graph applies
    them (export validation compares its logits with PyTorch's, which applies them too), and
    the answers equal PyTorch's."""
    from hydra_edge.data.records import read_records
    from hydra_edge.exporters.formats.onnx import export
    from hydra_edge.exporters.merge import hydra_on_plain_base
    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.inference.trained import generate_greedy
    from hydra_edge.models.tiny import DEMO_EVAL

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["heads"] == 3
    config_path.write_text(json.dumps({**config, "router_temperature": 0.25, "router_top_k": 2}))
    manifest = export(adapter, tmp_path / "onnx", mode="dynamic", log=lambda m: None)
    assert manifest["validation"]["checks"]["dynamic"]["max_abs_logit_diff"] <= 1e-3
    chat = OnnxChat(tmp_path / "onnx")
    model, tokenizer = hydra_on_plain_base(plain_base, adapter)
    conversations = [r.messages[:-1] for r in read_records(DEMO_EVAL)][:6]
    expected = generate_greedy(model, tokenizer, conversations, max_new_tokens=24)
    assert [chat.answer(c, max_new_tokens=24)[1] for c in conversations] == expected
