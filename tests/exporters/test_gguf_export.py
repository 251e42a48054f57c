"""`export --format gguf`: the base and every cluster's adapter as GGUF, checked in llama.cpp
(llama-cpp-python) against PyTorch; the files read back by gguf's reader, the Modelfiles by
Ollama's syntax; `eval/chat --gguf` answer like the PyTorch adapter; a GGUF file given as
--model comes back byte for byte; damaged files and a missing llama.cpp are one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.errors import UserError
from hydra_edge.exporters.gguf_files import architecture_of, read_gguf
from hydra_edge.exporters.gguf_layout import SERVER_CONFIG, base_path
from hydra_edge.exporters.manifest import MANIFEST
from hydra_edge.exporters.ollama import parse_modelfile
from hydra_edge.files import sha256_of

pytestmark = pytest.mark.slow
GGUF = ("--format", "gguf")


def test_every_cluster_passes_llama_cpp_validation(gguf_export):
    manifest = json.loads((gguf_export / MANIFEST).read_text())
    assert manifest["format"] == "gguf" and manifest["base"]["gguf_base"] == "q8_0"
    checks = manifest["validation"]["checks"]
    assert sorted(int(c) for c in checks) == manifest["clusters"]
    for check in checks.values():
        # llama.cpp on Q8_0 against PyTorch on the dequantized NF4 weights: rounding, not a broken file
        assert check["decisive_agreement"] >= 0.95 and check["relative_error"] < 0.05
        assert check["positions"] > 20
        assert 0.0 <= check["head_mix_top1_agreement"] <= 1.0
    assert manifest["files"]["base.gguf"] == sha256_of(gguf_export / "base.gguf")


def test_files_are_llama_cpp_adapters_and_a_q8_0_base(gguf_export):
    import gguf

    manifest = json.loads((gguf_export / MANIFEST).read_text())
    base = read_gguf(gguf_export / "base.gguf")
    assert base.fields["general.architecture"].contents() == "llama"
    assert "<|assistant|>" in base.fields["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type for t in base.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    for name in [f"cluster_{c}" for c in manifest["clusters"]] + [f"head_{i}" for i in range(manifest["heads"])]:
        lora = read_gguf(gguf_export / "adapters" / f"{name}.gguf")
        assert lora.fields["general.type"].contents() == "adapter"
        assert lora.fields["adapter.type"].contents() == "lora"
        assert lora.fields["adapter.lora.alpha"].contents() == pytest.approx(manifest["alpha"])
        shapes = {t.name: tuple(int(n) for n in t.shape) for t in lora.tensors}  # ggml order: (in, r) / (r, out)
        pairs = [name.removesuffix(".lora_a") for name in shapes if name.endswith(".lora_a")]
        assert pairs and all(name in types for name in pairs)  # each adapts a tensor of the base
        for name in pairs:
            assert shapes[f"{name}.lora_a"][1] == manifest["rank"] == shapes[f"{name}.lora_b"][0]


def test_modelfiles_name_the_base_the_cluster_adapter_the_template_and_stops(gguf_export):
    manifest = json.loads((gguf_export / MANIFEST).read_text())
    for cluster in manifest["clusters"]:
        path = gguf_export / "ollama" / f"cluster_{cluster}.Modelfile"
        parsed = parse_modelfile(path.read_text())
        assert (path.parent / parsed["from"]).resolve() == (gguf_export / "base.gguf").resolve()
        assert (path.parent / parsed["adapter"]).resolve() == (gguf_export / f"adapters/cluster_{cluster}.gguf")
        assert "{{ .Content }}" in parsed["template"] and "<|assistant|>" in parsed["template"]
        assert ("stop", "<|end|>") in parsed["parameters"]
    readme = (gguf_export / "README.md").read_text()
    assert "ollama create my-model-c0 -f ollama/cluster_0.Modelfile" in readme
    server = json.loads((gguf_export / SERVER_CONFIG).read_text())
    aliases = {m["model_alias"]: m for m in server["models"]}
    assert set(aliases) == {*(f"cluster_{c}" for c in manifest["clusters"]), "base"}
    assert aliases["cluster_0"]["lora_path"] == "adapters/cluster_0.gguf" and server["host"] == "127.0.0.1"


def test_eval_gguf_scores_like_the_pytorch_adapter(gguf_export, trained_adapter, small_eval):
    def scores(*engine):
        result = run_in_process("eval", *engine, "--data", str(small_eval), "--json", "--max-new-tokens", "16")
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    gguf, torch = scores("--gguf", str(gguf_export)), scores("--adapter", str(trained_adapter))
    assert gguf["n"] == torch["n"] == 2
    assert gguf["loss"] == pytest.approx(torch["loss"], rel=0.05)  # Q8_0 rounding, same clusters
    assert gguf["per_cluster"].keys() == torch["per_cluster"].keys()


def test_chat_gguf_answers_one_prompt_with_its_cluster(gguf_export):
    from hydra_edge.models.tiny import DEMO_EVAL

    row = json.loads(DEMO_EVAL.read_text().splitlines()[0])["messages"]
    question = row[0]["content"]
    result = run_in_process("chat", "--gguf", str(gguf_export), "--prompt", question, "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GGUF export (q8_0 base, llama.cpp)" in result.stderr
    from hydra_edge.exporters.gguf_chat import GgufChat

    messages = [{"role": "user", "content": question}]
    engine = GgufChat(gguf_export)
    cluster, answer = engine.answer(messages, max_new_tokens=24)
    assert result.stdout.strip() == answer and f"[cluster {cluster} |" in result.stderr
    assert len(answer) >= 3  # generated in llama.cpp


def test_switching_adapters_drops_the_kv_cache(gguf_export):
    """Cluster 0, 1, 0 on one engine give what a fresh llama.cpp gives for each: no state from the
    previous request's adapter survives the switch, for scoring and for generation."""
    from hydra_edge.data.records import prompt_ids
    from hydra_edge.exporters.gguf_chat import GgufChat
    from hydra_edge.exporters.gguf_runtime import LlamaRuntime
    from hydra_edge.inference.protocol import Sampling

    engine = GgufChat(gguf_export)
    ids = prompt_ids(engine.tokenizer(0), [{"role": "user", "content": "Give the antonym of the word early."}])
    files = {"cluster_0": gguf_export / "adapters/cluster_0.gguf", "cluster_1": gguf_export / "adapters/cluster_1.gguf"}

    def fresh(cluster):
        return LlamaRuntime(gguf_export / "base.gguf", files, n_ctx=256).logits({f"cluster_{cluster}": 1.0}, ids)

    scored = [engine.logits(c, ids) for c in (0, 1, 0)]
    np.testing.assert_array_equal(scored[0], fresh(0))
    np.testing.assert_array_equal(scored[1], fresh(1))
    np.testing.assert_array_equal(scored[2], scored[0])
    assert not np.array_equal(scored[0], scored[1])  # each cluster its own adapter

    def answer(cluster):
        return "".join(engine.stream(ids, cluster, "cluster", Sampling(max_new_tokens=12)))

    first_1, _, again_1 = answer(1), answer(0), answer(1)
    assert first_1 == again_1
    assert engine.forceable_clusters() == json.loads((gguf_export / MANIFEST).read_text())["clusters"]


def test_the_server_renders_chats_with_the_training_template(gguf_export):
    """serve-llama.sh registers the export's template with llama-cpp-python: its prompt is the
    one hydra-edge renders (whatever template the base file holds, or none)."""
    from transformers import AutoTokenizer

    from hydra_edge.data.records import render_chat
    from hydra_edge.exporters.llama_server import training_chat_formatter

    formatter = training_chat_formatter(gguf_export / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_export / "tokenizer")
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Antonym of early?"},
        {"role": "assistant", "content": "late"},
        {"role": "user", "content": "And of up?"},
    ]
    rendered = formatter(messages=conversation)
    assert rendered.prompt == render_chat(tokenizer, conversation, add_generation_prompt=True)
    assert tokenizer.eos_token_id in formatter.stop_token_ids


def test_a_gguf_model_comes_back_as_the_same_file(tiny_dir, tmp_path):
    """--model FILE.gguf: the export references the file by sha256 (auto), or copies it."""
    from hydra_edge.exporters.gguf_files import write_base_gguf
    from hydra_edge.models.tiny import CHAT_TEMPLATE, DEMO_TRAIN

    source = write_base_gguf(tiny_dir, tmp_path / "mine.gguf", "f32", None, CHAT_TEMPLATE)
    run = tmp_path / "run"
    settings = ("--quant", "none", "--mixed-precision", "no", "--heads", "2", "--max-steps", "4", "--seq-len", "64")
    trained = run_in_process(
        "finetune", "--model", str(source), "--data", str(DEMO_TRAIN), "--out", str(run), *settings
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    for choice in ("auto", "copy"):
        out = tmp_path / f"export-{choice}"
        result = run_in_process(
            "export", "--adapter", str(run), "--out", str(out), "--format", "gguf", "--gguf-base", choice
        )
        assert result.returncode == 0, result.stderr[-2000:]
        manifest = json.loads((out / MANIFEST).read_text())
        assert sha256_of(base_path(out, manifest)) == sha256_of(source)
        assert (out / "base.gguf").exists() == (choice == "copy")
    source.write_bytes(source.read_bytes()[:-8] + b"\0" * 8)  # the user's file changes afterwards
    changed = run_in_process("chat", "--gguf", str(tmp_path / "export-auto"), "--prompt", "hi")
    assert_one_line_error(changed, "mine.gguf", "changed since")


def test_a_damaged_base_or_adapter_is_one_line(gguf_export, tmp_path):
    from hydra_edge.exporters.gguf_runtime import LlamaRuntime

    damaged = tmp_path / "base.gguf"
    damaged.write_bytes((gguf_export / "base.gguf").read_bytes()[:5000])
    with pytest.raises(UserError, match="base.gguf: llama.cpp cannot use it"):
        LlamaRuntime(damaged, {})
    adapter = tmp_path / "cluster_0.gguf"
    adapter.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 64)
    with pytest.raises(UserError, match="cluster_0.gguf: llama.cpp cannot load this LoRA adapter"):
        LlamaRuntime(gguf_export / "base.gguf", {"cluster_0": adapter})
    with pytest.raises(UserError, match="not a readable GGUF file"):
        read_gguf(damaged)


def test_missing_llama_cpp_is_one_line(gguf_export, trained_adapter, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    export = run_in_process(
        "export", "--adapter", str(trained_adapter), "--out", str(tmp_path / "x"), "--format", "gguf"
    )
    assert_one_line_error(export, "llama-cpp-python", "pip install 'hydra-edge[llama]'")
    assert not (tmp_path / "x").exists()
    chat = run_in_process("chat", "--gguf", str(gguf_export), "--prompt", "hi")
    assert_one_line_error(chat, "llama-cpp-python")


def test_an_architecture_the_writer_does_not_know_is_one_line(trained_adapter, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="knows the model types .* not 'qwen2'"):
        architecture_of({"model_type": "qwen2"}, None)
    with pytest.raises(UserError, match="SentencePiece"):
        architecture_of({"model_type": "gemma3_text"}, None)  # from a Hugging Face folder
    monkeypatch.setattr("hydra_edge.exporters.gguf_files.MODEL_TYPES", {"gemma3_text": "gemma3"})
    result = run_in_process(
        "export", "--adapter", str(trained_adapter), "--out", str(tmp_path / "x"), "--format", "gguf"
    )
    assert_one_line_error(result, "--format gguf", "'llama'")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".export-*"))


def test_gguf_is_refused_by_the_onnx_engine_and_onnx_by_the_gguf_engine(gguf_export, adapter_export):
    onnx = run_in_process("chat", "--onnx", str(gguf_export), "--prompt", "hi")
    assert onnx.returncode == 2
    gguf = run_in_process("chat", "--gguf", str(adapter_export), "--prompt", "hi")
    assert_one_line_error(gguf, "--format onnx export", "--onnx")


def test_the_web_uis_chat_lists_and_loads_a_gguf_export(gguf_export, tmp_path):
    import shutil

    from hydra_edge.ui.chatting import ChatModels
    from hydra_edge.ui.workspace import EXPORTS_DIR, Workspace

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(gguf_export, ws.root / EXPORTS_DIR / "mine-gguf")
    models = ChatModels(ws)
    assert f"{EXPORTS_DIR}/mine-gguf" in models.sources()
    loaded = models.get(f"{EXPORTS_DIR}/mine-gguf")
    assert loaded.backend == "llama.cpp" and "GGUF export" in loaded.description
    peft = ws.root / EXPORTS_DIR / "mine-peft"
    peft.mkdir()
    (peft / MANIFEST).write_text(json.dumps({"format": "peft"}))
    assert f"{EXPORTS_DIR}/mine-peft" not in models.sources()
    with pytest.raises(UserError, match="--format peft export runs elsewhere"):
        models.get(f"{EXPORTS_DIR}/mine-peft")
