"""adapter_config.json uses the CLI's names (rank, quant, heads); an adapter written with the first
names of this format version (r, quantization) still loads."""

import json

import torch
from safetensors.torch import save_file

from hydra_edge.adapter.config import CONFIG_FILE, WEIGHTS_FILE, AdapterConfig


def _adapter(folder, **keys) -> None:
    folder.mkdir()
    config = {"format_version": 1, "base_model": "tiny", "base_fingerprint": "st-0", "alpha": 4.0, "heads": 1}
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "target_modules": ["m"], **keys}))
    weights = {"m.hydra_A": torch.zeros(2, 4), "m.hydra_B": torch.zeros(1, 4, 2), "m.hydra_router": torch.zeros(1, 4)}
    save_file(weights, str(folder / WEIGHTS_FILE))


def test_an_adapter_with_the_first_key_names_loads_under_the_cli_names(tmp_path):
    _adapter(tmp_path / "old", r=2, quantization="nf4")
    config = AdapterConfig.load(tmp_path / "old")
    assert config.rank == 2 and config.quant == "nf4" and config.scaling == 2.0


def test_a_saved_adapter_config_uses_the_cli_names(tmp_path):
    _adapter(tmp_path / "new", rank=2, quant="none")
    config = AdapterConfig.load(tmp_path / "new")
    config.save(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / CONFIG_FILE).read_text())
    assert saved["rank"] == 2 and saved["quant"] == "none" and "r" not in saved and "quantization" not in saved
    assert AdapterConfig.load(tmp_path / "new") == config
