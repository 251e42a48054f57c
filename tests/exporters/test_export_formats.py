"""Export formats are plug-ins: a module in hydra_edge/exporters/formats/ is a format of
`hydra-edge export --format` and of the UI's Export tab, with its options, without other edits;
the built-in peft and vllm formats write validated folders."""

import inspect
import json

import pytest
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.exporters import formats

FAKE_FORMAT = """
from pathlib import Path

from hydra_edge.exporters.formats import ExportFormat, Option


def export(adapter_dir: Path, out_dir: Path, log, level: str) -> dict:
    out_dir.mkdir(parents=True)
    (out_dir / "fake.txt").write_text(f"{adapter_dir.name} at {level}")
    return {"format": "fake", "level": level}


FORMAT = ExportFormat(
    name="fake",
    summary="A format the registry finds by itself.",
    export=export,
    required_files=lambda manifest: ["fake.txt"],
    describe=lambda manifest: f"fake export at level {manifest['level']}",
    options=(Option("level", "low", "How much fake to write.", ("low", "high")),),
)
"""


@pytest.fixture
def fake_format(tmp_path, monkeypatch):
    """A format module in a folder the formats package also searches: as good as adding a file there."""
    folder = tmp_path / "more_formats"
    folder.mkdir()
    (folder / "fake.py").write_text(FAKE_FORMAT)
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(folder)])
    yield "fake"


def test_the_built_in_formats_are_found_the_default_first():
    assert list(formats.formats()) == ["onnx", "gguf", "peft", "vllm"]
    assert [o.name for o in formats.get_format("onnx").options] == ["mode", "precision", "device"]


def test_a_new_format_module_is_in_export_help_and_runs(fake_format, tmp_path):
    shown = run_in_process("export", "--help")
    assert shown.returncode == 0
    assert "--format <onnx|fake|gguf|peft|vllm>" in shown.stdout
    assert "--level" in shown.stdout and "[--format fake]" in shown.stdout
    (tmp_path / "run").mkdir()
    done = run_in_process(
        "export",
        "--adapter",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "x"),
        "--format",
        "fake",
        "--level",
        "high",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x" / "fake.txt").read_text() == "run at high"
    assert "fake export at level high" in done.stdout


def test_an_option_of_another_format_is_one_line(tmp_path):
    result = run_in_process(
        "export", "--adapter", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "peft", "--mode", "merged"
    )
    assert_one_line_error(result, "--mode", "--format peft")
    assert not (tmp_path / "x").exists()


def test_a_new_format_module_is_in_the_ui_export_tab(fake_format, tmp_path):
    pytest.importorskip("gradio")
    from hydra_edge.ui.app import create_ui

    demo = create_ui(tmp_path / "ws")
    try:
        widgets = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        assert "fake" in [c[0] if isinstance(c, tuple) else c for c in widgets["export-format"].choices]
        level = widgets["export-level"]
        assert [c[0] if isinstance(c, tuple) else c for c in level.choices] == ["low", "high"]
        assert level.visible is False  # shown once the fake format is picked
        (fn,) = [f for f in demo.fns.values() if f.api_name == "export"]
        assert "level" in inspect.signature(fn.fn).parameters
    finally:
        demo.close()


def test_the_ui_builds_the_command_of_any_format(fake_format, tmp_path):
    import torch
    from safetensors.torch import save_file

    from hydra_edge.ui.exporting import build_command
    from hydra_edge.ui.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = ws.root / "runs" / "r"
    run.mkdir(parents=True)
    config = {"format_version": 1, "base_model": "tiny", "base_fingerprint": "st-0", "quantization": "none"}
    (run / "adapter_config.json").write_text(
        json.dumps({**config, "r": 2, "alpha": 4.0, "heads": 1, "target_modules": ["m"]})
    )
    weights = {"m.hydra_A": torch.zeros(2, 4), "m.hydra_B": torch.zeros(1, 4, 2), "m.hydra_router": torch.zeros(1, 4)}
    save_file(weights, str(run / "adapter_model.safetensors"))
    argv, out = build_command(ws, "runs/r", "", "fake", {"level": "high", "mode": "merged"})
    assert argv[-4:] == ["--format", "fake", "--level", "high"] and out.name == "r-fake-high"
    argv, out = build_command(ws, "runs/r", "", "onnx", {"mode": "merged"})
    assert argv[-8:] == ["--format", "onnx", "--mode", "merged", "--precision", "fp32", "--device", "cpu"]


@pytest.mark.parametrize("name", ["peft", "vllm"])
def test_peft_and_vllm_exports_are_validated_and_load_in_peft(name, trained_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from torch.testing import assert_close
    from transformers import AutoModelForCausalLM

    from hydra_edge.adapter.gates import cluster_gates
    from hydra_edge.adapter.switches import fixed_gates
    from hydra_edge.exporters.manifest import verify_export
    from hydra_edge.exporters.merge import hydra_on_plain_base

    out = tmp_path / name
    manifest = formats.run_export(trained_adapter, out, name, {}, log=lambda m: None)
    fmt = formats.get_format(name)
    assert manifest["format"] == name and verify_export(out, fmt.required_files) == manifest
    assert all(c["max_abs_logit_diff"] <= 1e-3 for c in manifest["validation"]["checks"].values())
    assert (out / "serve-vllm.sh").is_file() == (name == "vllm")
    assert not (out / "models").exists()  # no ONNX in a PEFT export
    cluster = manifest["clusters"][-1]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "peft" / "base"), out / "peft" / f"cluster_{cluster}"
    ).eval()
    ours, tokenizer = hydra_on_plain_base(out / "peft" / "base", trained_adapter)
    ids = torch.tensor([tokenizer("What is the capital of Peru?")["input_ids"]])
    with torch.no_grad(), fixed_gates(ours, cluster_gates(trained_adapter)[cluster]):
        assert_close(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="not an ONNX"):
        from hydra_edge.exporters.formats.onnx import verify_onnx_export

        verify_onnx_export(out)
