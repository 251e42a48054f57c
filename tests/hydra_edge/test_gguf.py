"""GGUF files in: a GGUF written from the tiny preset is converted once, fine-tuned and loaded
back by its fingerprint; a damaged file, a missing gguf package or an ambiguous folder is one line."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.errors import UserError
from hydra_edge.exporters.gguf_files import write_base_gguf
from hydra_edge.models.tiny import CHAT_TEMPLATE, DEMO_EVAL, DEMO_TRAIN

FP32 = ("--quant", "none", "--mixed-precision", "no", "--heads", "2", "--data", str(DEMO_TRAIN))


@pytest.fixture(scope="module")
def few_eval_rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:6]))
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    return write_base_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32", None, CHAT_TEMPLATE)


def test_gguf_converts_once_to_the_same_model(tiny_gguf, tiny_dir):
    from transformers import AutoModelForCausalLM

    from hydra_edge.models.base import resolve_model_reference
    from hydra_edge.models.gguf import SOURCE_FILE

    folder = Path(resolve_model_reference(str(tiny_gguf)))
    assert (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert Path(resolve_model_reference(str(tiny_gguf.parent))) == folder  # a folder holding one GGUF
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # cached, not converted again
    ids = torch.tensor([[5, 17, 300, 42, 9, 600]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    # Converted to bf16: equal to bf16 rounding of the weights.
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_finetune_on_a_gguf_file_then_eval_loads_it_by_fingerprint(tiny_gguf, tmp_path, few_eval_rows):
    import json

    out = tmp_path / "run"
    result = run_in_process(
        "finetune",
        "--model",
        str(tiny_gguf),
        "--max-steps",
        "2",
        "--out",
        str(out),
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--eval-data",
        str(few_eval_rows),
        *FP32,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "adapter_config.json").read_text())
    from hydra_edge.files import sha256_of

    assert config["base_fingerprint"] == f"gguf-{sha256_of(tiny_gguf)[:32]}"
    assert "gates: rows" in result.stderr and "eval answers: rows" in result.stderr  # progress after training
    evaluated = run_in_process("eval", "--adapter", str(out), "--data", str(few_eval_rows), "--max-new-tokens", "4")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def test_an_adapter_refuses_a_different_gguf(tiny_gguf, tiny_dir, tmp_path, few_eval_rows):
    out = tmp_path / "run"
    assert (
        run_in_process(
            "finetune",
            "--model",
            str(tiny_gguf),
            "--max-steps",
            "1",
            "--out",
            str(out),
            "--seq-len",
            "64",
            "--batch-size",
            "4",
            *FP32,
        ).returncode
        == 0
    )
    other = write_base_gguf(tiny_dir, tmp_path / "tiny-f16.gguf", "f16", None, CHAT_TEMPLATE)  # same model, other file
    result = run_in_process(
        "eval", "--adapter", str(out), "--model", str(other), "--data", str(few_eval_rows), "--max-new-tokens", "4"
    )
    assert_one_line_error(result, "fingerprint")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_gguf_is_one_line(tiny_gguf, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(b"GGUF" + b"\x07" * 200 if damage == "garbage" else data[: len(data) // 3])
    result = run_in_process("finetune", "--model", str(bad), "--max-steps", "1", "--out", str(tmp_path / "o"), *FP32)
    assert_one_line_error(result, str(bad), "GGUF")


def test_missing_gguf_package_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    from hydra_edge.models.gguf import converted_folder

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    monkeypatch.setenv("HYDRA_EDGE_HOME", str(tmp_path))  # nothing converted yet
    copy = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, copy)
    with pytest.raises(UserError, match=r"pip install 'hydra-edge\[gguf\]'"):
        converted_folder(copy, str(copy), log=lambda m: None)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())  # no half folder


def test_a_folder_with_two_gguf_files_asks_for_one(tiny_gguf, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf, tmp_path / name)
    result = run_in_process(
        "finetune", "--model", str(tmp_path), "--max-steps", "1", "--out", str(tmp_path / "o"), *FP32
    )
    assert_one_line_error(result, "2 GGUF files", "a.gguf")


def test_gemma_chat_template_renders_turns_and_learns_the_answer():
    from transformers import PreTrainedTokenizerFast

    from hydra_edge.data.records import _assistant_spans
    from hydra_edge.models.gguf import GEMMA_CHAT_TEMPLATE
    from hydra_edge.models.tiny import tiny_model_dir

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir())
    tokenizer.bos_token = "<|system|>"  # stands in for <bos>
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
    ]
    full, spans = _assistant_spans(tokenizer, messages)
    assert full == (
        "<|system|><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    )
    assert [full[s:e] for s, e in spans] == ["Hello.<end_of_turn>"]
