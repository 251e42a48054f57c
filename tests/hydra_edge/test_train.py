"""The training loop: the non-finite guard, and stop-by-signal + resume equals one straight run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hydra_edge.training.optimizer_step as step_module  # looks compute_loss up at every micro-batch
from hydra_edge.adapter.inject import adapter_state_dict
from hydra_edge.errors import TrainingDiverged
from hydra_edge.training.config import build_config
from hydra_edge.training.finetune import run_finetune

pytestmark = pytest.mark.slow  # trains, exports or drives a browser

# fp32 end to end (no quantization, no autocast, no dropout) so runs are bit-comparable.
FP32 = {"quant": "none", "mixed_precision": "no", "dropout": 0.0, "heads": "2", "batch_size": 4, "seq_len": 64}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def test_non_finite_loss_leaves_parameters_unchanged(tmp_path, monkeypatch):
    bad_step = 3
    calls = {"n": 0}
    real_loss = step_module.compute_loss

    def loss_with_nan(model, batch, collected):
        calls["n"] += 1
        loss, *router_losses = real_loss(model, batch, collected)
        return (loss * float("nan") if calls["n"] == bad_step else loss), *router_losses

    monkeypatch.setattr(step_module, "compute_loss", loss_with_nan)
    seen = {}

    def on_step(step, model, skipped):
        seen[step] = (snapshot(model), skipped)

    config = build_config({}, {**FP32, "out": str(tmp_path / "run"), "max_steps": 5, "grad_accum": 1})
    result = run_finetune(config, on_step=on_step)
    assert result["train"]["skipped_steps"] == 1
    assert seen[bad_step][1] is True and seen[bad_step - 1][1] is False
    for key, before in seen[bad_step - 1][0].items():
        assert torch.equal(seen[bad_step][0][key], before), key
    # and the steps around it did change the parameters
    assert any(not torch.equal(seen[bad_step + 1][0][k], v) for k, v in seen[bad_step][0].items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]


def test_non_finite_gradient_with_finite_loss_is_skipped(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = step_module.compute_loss

    def loss_with_nan_gradient(model, batch, collected):
        calls["n"] += 1
        loss, *router_losses = real_loss(model, batch, collected)
        if calls["n"] == 2:
            loss.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
        return loss, *router_losses

    monkeypatch.setattr(step_module, "compute_loss", loss_with_nan_gradient)
    seen = {}
    config = build_config({}, {**FP32, "out": str(tmp_path / "run"), "max_steps": 3, "grad_accum": 1})
    run_finetune(config, on_step=lambda step, model, skipped: seen.setdefault(step, (snapshot(model), skipped)))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False] and all(r["loss"] == r["loss"] for r in rows)
    for key, before in seen[1][0].items():
        assert torch.equal(seen[2][0][key], before), key


def test_consecutive_non_finite_steps_abort(tmp_path, monkeypatch):
    real_loss = step_module.compute_loss
    monkeypatch.setattr(
        step_module, "compute_loss", lambda *args: tuple(part * float("inf") for part in real_loss(*args))
    )
    config = build_config({}, {**FP32, "out": str(tmp_path / "run"), "max_steps": 10, "max_bad_steps": 3})
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        run_finetune(config)


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "hydra_edge", "finetune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
        **kw,
    )


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") != "eval"]


def _training_rows(metrics: Path) -> int:
    """Training rows written so far (a file being written: its last line may be torn)."""
    return sum('"kind": "eval"' not in line for line in metrics.read_text().splitlines())


@pytest.mark.parametrize(
    "schedule",
    [[], ["--lr-scheduler", "cosine_with_min_lr", "--optim", "adamw_8bit", "--eval-every", "6"]],
    ids=["cosine-adamw", "min-lr-adamw8bit-evals"],
)
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, tiny_dir, schedule):
    """Also with another schedule, bitsandbytes' 8-bit AdamW (its quantized states go through the
    checkpoint) and held-out evals in between."""
    steps = 30
    flags = [
        *schedule,
        "--quant",
        "none",
        "--mixed-precision",
        "no",
        "--heads",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--max-steps",
        str(steps),
        "--save-every",
        "7",
        "--dropout",
        "0.1",
        "--grad-accum",
        "2",
    ]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    proc = _cli(*flags, "--out", str(stopped))
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and _training_rows(metrics) >= 10:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in err.splitlines()[-1]
    stopped_at = _training_rows(metrics)
    assert 10 <= stopped_at < steps
    assert (stopped / "checkpoints" / f"step-{stopped_at:06d}" / "trainer_state.json").is_file()

    resumed = _cli("--out", str(stopped), "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]

    full = _cli(*flags, "--out", str(straight))
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-2000:]

    assert _losses(stopped) == pytest.approx(_losses(straight), abs=1e-6)
    assert len(_losses(stopped)) == steps
    a = load_file(str(stopped / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert not list((stopped / "checkpoints").glob(".tmp-*"))


def test_two_process_ddp_run_on_cpu(tmp_path, tiny_dir):
    """torchrun (as accelerate launch would) with 2 CPU processes: one set of outputs, one log."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "hydra_edge",
            "finetune",
            "--out",
            str(out),
            "--max-steps",
            "4",
            "--heads",
            "2",
            "--seq-len",
            "64",
            "--batch-size",
            "4",
            "--save-every",
            "2",
            "--quant",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "adapter_model.safetensors").is_file() and (out / "eval_results.json").is_file()
    assert result.stderr.count("model: tiny") == 1  # only the main process reports


def test_pooling_groups_per_sample_prompt_and_cluster():
    from hydra_edge.data.records import IGNORE_INDEX
    from hydra_edge.training.losses import pooling_groups

    I = IGNORE_INDEX  # noqa: E741  (reads like the label grid it fills)
    batch = {  # row 0: one sample (cluster 2) + padding; row 1: two packed samples (clusters 0 and 2)
        "segment_ids": torch.tensor([[0, 0, 0, -1], [0, 0, 1, 1]]),
        "cluster_ids": torch.tensor([[2, 2, 2, -1], [0, 0, 2, 2]]),
        "labels": torch.tensor([[I, 5, 6, I], [I, 7, I, 8]]),
    }
    groups, sources = pooling_groups(batch, "sample")
    assert groups.tolist() == [[0, 0, 0, -1], [4, 4, 5, 5]]  # one id per sample across the batch
    assert sources.tolist() == [[True, True, True, False], [True, True, True, True]]
    groups, sources = pooling_groups(batch, "prompt")
    assert groups.tolist() == [[0, 0, 0, -1], [4, 4, 5, 5]]
    assert sources.tolist() == [[True, False, False, False], [True, False, True, False]]  # prompt tokens only
    groups, sources = pooling_groups(batch, "cluster")
    assert groups.tolist() == [[2, 2, 2, -1], [0, 0, 2, 2]]  # cluster 2 spans both rows
    assert sources.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_an_error_after_training_says_where_the_adapter_is_and_how_to_score_it(tmp_path, monkeypatch, capsys):
    import hydra_edge.inference.evaluate

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("a bug in scoring")

    monkeypatch.setattr(hydra_edge.inference.evaluate, "evaluate", broken_evaluate)
    out = tmp_path / "run"
    config = build_config({}, {**FP32, "out": str(out), "max_steps": 2, "grad_accum": 1})
    with pytest.raises(RuntimeError, match="a bug in scoring"):
        run_finetune(config)
    assert (out / "adapter_model.safetensors").is_file() and (out / "cluster_gates.safetensors").is_file()
    notice = capsys.readouterr().err.strip().splitlines()[-1]
    assert notice.startswith(f"finetune: the trained adapter is saved in {out}; score it with: hydra-edge eval")


def test_a_bf16_run_hands_back_the_model_as_loaded(tmp_path, tiny_dir):
    """accelerate wraps the forward of a mixed-precision model (autocast, outputs cast to float32);
    after training the wrapper is gone, so gates, eval and export compute what a freshly loaded
    adapter computes (and the bf16 LM head is not handed float32 states outside autocast)."""
    from hydra_edge.adapter.inject import find_target_modules, inject_hydra_lora
    from hydra_edge.data.records import read_records, tokenize_records
    from hydra_edge.models.base import load_base
    from hydra_edge.models.tiny import DEMO_TRAIN
    from hydra_edge.training.config import FinetuneConfig
    from hydra_edge.training.loop import train_loop
    from hydra_edge.training.step_plan import StepPlan

    base = load_base("tiny", quant="none", device="cpu", dtype="bf16")
    inject_hydra_lora(base.model, find_target_modules(base.model, "mlp"), 4, 8, 2, 0.0, "zero")
    records = read_records(DEMO_TRAIN)[:8]
    samples = tokenize_records(base.tokenizer, records, 64, [0] * len(records), "truncate", False).samples
    config = FinetuneConfig(
        batch_size=4, grad_accum=1, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0, seed=0, save_every=0,
        max_bad_steps=3, pooled_steps=0.0,
    )  # fmt: skip
    plan = StepPlan(total_steps=1, warmup_steps=0)
    train_loop(base.model, samples, config, plan, tmp_path, base.tokenizer.pad_token_id, "bf16")
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([samples[0].input_ids])).logits
    assert logits.dtype == torch.bfloat16
    assert "forward" not in vars(base.model) or not hasattr(vars(base.model)["forward"], "__wrapped__")
