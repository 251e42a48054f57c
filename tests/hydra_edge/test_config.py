"""Settings: YAML < flags < validation; the tiny preset only fills what nobody set."""

import pytest

from hydra_edge.errors import UserError
from hydra_edge.training.config import TINY_PRESET_DEFAULTS, FinetuneConfig, build_config, read_yaml_config


def test_flags_override_yaml_and_preset_fills_the_rest():
    config = build_config({"lr": 0.01, "rank": 4}, {"rank": 2})
    assert config.rank == 2 and config.lr == 0.01
    assert config.max_steps == TINY_PRESET_DEFAULTS["max_steps"]


def test_preset_does_not_apply_to_other_models():
    config = build_config({}, {"model": "Qwen/Qwen2.5-0.5B-Instruct"})
    assert config.lr == FinetuneConfig.lr and config.max_steps is None and config.seq_len == 1024


def test_gemma_preset_fills_its_own_defaults():
    from hydra_edge.training.config import GEMMA_PRESET_DEFAULTS

    config = build_config({}, {"model": "gemma3-270m", "lr": 1e-3})
    assert config.lr == 1e-3 and config.max_steps == GEMMA_PRESET_DEFAULTS["max_steps"]
    assert config.gate_samples_per_cluster == GEMMA_PRESET_DEFAULTS["gate_samples_per_cluster"]


def test_epochs_given_means_no_preset_step_count():
    assert build_config({}, {"epochs": 2.0}).max_steps is None


@pytest.mark.parametrize(
    "settings, flag",
    [
        ({"rank": 0}, "--rank"),
        ({"dropout": 1.5}, "--dropout"),
        ({"heads": "0"}, "--heads"),
        ({"quant": "int8"}, "--quant"),
        ({"lr": -1.0}, "--lr"),
        ({"mixed_precision": "fp8"}, "--mixed-precision"),
        ({"pool_over": "answer"}, "--pool-over"),
    ],
)
def test_bad_values_name_the_flag(settings, flag):
    with pytest.raises(UserError, match=flag):
        build_config({}, settings)


def test_both_epochs_and_max_steps_refused():
    with pytest.raises(UserError, match="not both"):
        build_config({}, {"epochs": 1.0, "max_steps": 3})


def test_yaml_types_and_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rank: 4\nalpha: 16\ndata: one.jsonl\nmax-steps: 10\n")
    assert read_yaml_config(path) == {"rank": 4, "alpha": 16.0, "data": ["one.jsonl"], "max_steps": 10}
    path.write_text("rank: [1]\n")
    with pytest.raises(UserError, match="'rank'"):
        read_yaml_config(path)
    path.write_text("gradient_checkpointing: 3\n")
    with pytest.raises(UserError, match="'gradient_checkpointing'"):
        read_yaml_config(path)
    path.write_text("rank: 4\n  bad indent: [\n")
    with pytest.raises(UserError, match="invalid YAML"):
        read_yaml_config(path)


@pytest.mark.parametrize(
    "flags, expected, cpu_class",
    [
        ({"avx2", "fma"}, "no", "AVX2"),
        ({"avx2", "avx512f"}, "no", "AVX512"),
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16", "AVX512-BF16/AMX"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bf16", "AVX512-BF16/AMX"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, flags, expected, cpu_class):
    from hydra_edge.models import base as models

    monkeypatch.setattr(models, "_cpu_flags", lambda: flags)
    assert models.cpu_class() == cpu_class
    assert models.resolve_mixed_precision("auto", "cpu") == expected
    assert models.resolve_mixed_precision("bf16", "cpu") == "bf16"  # an explicit choice stands
    assert build_config({}, {}).mixed_precision == "auto"


def test_max_k_is_checked_once_for_finetune_and_clusters():
    from hydra_edge.cli.settings import ClusterSettings

    assert build_config({}, {"heads": "3", "max_k": 1}).max_k == 1  # unused with a fixed --heads
    assert ClusterSettings(data=["x.jsonl"], heads="3", max_k=1).fixed_heads == 3
    assert build_config({}, {"max_k": 40}).max_k == 40
    with pytest.raises(UserError, match="--max-k 1: must be >= 2 with --heads auto"):
        build_config({}, {"max_k": 1})
    with pytest.raises(ValueError, match="--max-k 1: must be >= 2 with --heads auto"):
        ClusterSettings(data=["x.jsonl"], max_k=1)


def test_repeated_data_flags_all_train(monkeypatch, tmp_path):
    """`--data a --data b` mixes both files (each --data is a file; the settings keep all of them)."""
    from cli_helpers import run_in_process

    from hydra_edge.cli import app as cli_app

    seen = []
    monkeypatch.setattr(cli_app, "run_and_report", lambda settings, explicit: seen.append(settings))
    result = run_in_process("finetune", "--data", "a.jsonl", "--data", "b.jsonl", "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert seen[0].data == ["a.jsonl", "b.jsonl"]


def test_the_old_console_script_entry_point_still_answers():
    import hydra_edge.cli
    from hydra_edge.cli.app import main

    assert hydra_edge.cli.main is main
