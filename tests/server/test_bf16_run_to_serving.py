"""The bf16 path end to end, forced on any CPU: finetune (with held-out passes), --resume, eval,
chat, export and serve, each as a user runs it.

bf16 is what `--mixed-precision auto` picks on every CUDA GPU and on CPUs with AVX512-BF16 or
AMX. On an AVX2-only CPU it is emulated and slow, so the run is a few steps of the tiny preset.
"""

import json

import httpx
import pytest
from cli_helpers import run_cli
from serverhelpers import API_KEY, launch

from hydra_edge.models.tiny import DEMO_EVAL

pytestmark = pytest.mark.slow


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def test_bf16_finetune_resume_eval_chat_export_and_serve(tmp_path):
    out, held_out = tmp_path / "run", tmp_path / "held_out.jsonl"
    held_out.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:12]))
    small = ["--heads", "2", "--seq-len", "64", "--batch-size", "4", "--eval-data", str(held_out),
             "--eval-em-rows", "2", "--max-new-tokens", "8", "--gate-samples-per-cluster", "8"]  # fmt: skip
    _ok(run_cli("finetune", "--mixed-precision", "bf16", "--max-steps", "4", "--eval-every", "2", *small,
                "--out", str(out)))  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["dtype"] == "bf16"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics if row.get("kind") == "eval"] == [2, 4]
    first = json.loads((out / "eval_results.json").read_text())
    assert first["n"] == 12 and first["loss"] is not None

    _ok(run_cli("finetune", "--out", str(out), "--resume", "--max-steps", "6"))
    resumed = json.loads((out / "eval_results.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text())["training"]["steps"] == 6
    assert resumed["loss"] != first["loss"]

    # eval, and below serve, run the PyTorch engine that `chat --adapter` runs
    scored = _ok(run_cli("eval", "--adapter", str(out), "--data", str(held_out), "--json"))
    assert json.loads(scored.stdout)["loss"] == pytest.approx(resumed["loss"], rel=1e-3)

    export = tmp_path / "export"
    _ok(run_cli("export", "--adapter", str(out), "--out", str(export)))
    _ok(run_cli("chat", "--onnx", str(export), "--prompt", "Is this review positive? I loved it."))

    server = launch(tmp_path, "--adapter", str(out), "--api-key", API_KEY)
    try:
        reply = httpx.post(
            f"{server.url}/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={
                "model": "auto",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "Is this review positive? I loved it."}],
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
