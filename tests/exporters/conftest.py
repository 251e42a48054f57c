import pytest


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_dir):
    """A small HydraLoRA adapter on the NF4 tiny preset, trained in-process (a few seconds)."""
    from hydra_edge.config import build_config
    from hydra_edge.finetune import run_finetune

    out = tmp_path_factory.mktemp("adapter") / "run"
    run_finetune(build_config({}, {"out": str(out), "max_steps": 60, "heads": "3", "eval_data": None}))
    return out
