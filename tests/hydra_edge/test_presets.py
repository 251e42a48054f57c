"""Presets are YAML files in the format of a user's --config, shipped with the package and listed by
`hydra-edge presets`; a preset's file and `--model NAME` give the same run settings."""

from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.errors import UserError
from hydra_edge.models.gguf import GEMMA_NAME
from hydra_edge.models.tiny import TINY_NAME
from hydra_edge.training import config as config_module
from hydra_edge.training.config import build_config, preset_files, read_yaml_config


def test_the_presets_are_the_models_the_loader_knows():
    assert sorted(preset_files()) == sorted([TINY_NAME, GEMMA_NAME])


@pytest.mark.parametrize("name", sorted(preset_files()))
def test_a_preset_file_is_a_config_giving_what_model_name_gives(name):
    path = preset_files()[name]
    from_file = build_config(read_yaml_config(path), {})
    from_flag = build_config({}, {"model": name})
    assert from_file == from_flag and from_file.model == name
    assert from_file.max_steps == config_module.PRESET_DEFAULTS[name]["max_steps"]


def test_a_user_yaml_and_flags_override_a_preset(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\nlr: 0.01\n")
    settings = build_config(read_yaml_config(config), {"max_steps": 7})
    assert settings.lr == 0.01 and settings.max_steps == 7
    assert settings.batch_size == config_module.TINY_PRESET_DEFAULTS["batch_size"]


def test_presets_lists_each_with_its_description_settings_and_file():
    result = run_in_process("presets")
    assert result.returncode == 0, result.stderr
    for name, path in preset_files().items():
        assert f"{name}: " in result.stdout and str(path) in result.stdout
    assert "lr=0.003" in result.stdout  # the tiny preset's learning rate, from its file


def test_presets_show_prints_the_file_and_refuses_an_unknown_name():
    shown = run_in_process("presets", "--show", "tiny")
    assert shown.returncode == 0 and shown.stdout == preset_files()["tiny"].read_text()
    assert_one_line_error(run_in_process("presets", "--show", "nope"), "--show nope", "tiny")


def test_a_preset_file_naming_another_model_is_refused(tmp_path):
    wrong = Path(tmp_path) / "tiny.yaml"
    wrong.write_text("model: gemma3-270m\nlr: 0.1\n")
    with pytest.raises(UserError, match="model: tiny"):
        config_module._preset_defaults("tiny", wrong)
