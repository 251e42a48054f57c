"""The CLI end to end: the embedded default, the adapter contract, eval, chat and user errors."""

import json

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file

EVAL_KEYS = {"loss", "perplexity", "exact_match", "n", "per_cluster"}


def test_default_finetune_learns_the_demo(demo_run):
    out, result = demo_run
    assert "held-out: exact-match" in result.stdout
    scores = json.loads((out / "eval_results.json").read_text())
    assert set(scores) == EVAL_KEYS
    assert scores["exact_match"] >= 0.5, scores
    assert scores["n"] == sum(c["n"] for c in scores["per_cluster"].values())


def test_adapter_directory_contract(demo_run):
    out, _ = demo_run
    config = json.loads((out / "adapter_config.json").read_text())
    for key in (
        "format_version",
        "base_model",
        "base_fingerprint",
        "quant",
        "rank",
        "alpha",
        "heads",
        "dropout",
        "target_modules",
        "chat_template",
    ):
        assert key in config, key
    assert config["quant"] == "nf4" and config["base_model"] == "tiny"
    weights = load_file(str(out / "adapter_model.safetensors"))
    r, n = config["rank"], config["heads"]
    assert len(weights) == 3 * len(config["target_modules"])
    for module in config["target_modules"]:
        a, b, router = (weights[f"{module}.hydra_{k}"] for k in ("A", "B", "router"))
        assert a.shape[0] == r and b.shape[0] == n and b.shape[2] == r and router.shape == (n, a.shape[1])
    assert all(m.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for m in config["target_modules"])
    gates = load_file(str(out / "cluster_gates.safetensors"))
    clusters = json.loads((out / "clusters.json").read_text())
    assert len(gates) == clusters["k"] * len(config["target_modules"])
    for value in gates.values():
        assert value.shape == (n,) and abs(float(value.sum()) - 1) < 1e-4
    assert (out / "clusters.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert {"loss", "lr", "tokens_per_s"} <= rows[0].keys()
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.bin"))


def test_eval_json_matches_finetune_report(demo_run):
    out, _ = demo_run
    from hydra_edge.models.tiny import DEMO_EVAL

    result = run_cli("eval", "--adapter", str(out), "--data", str(DEMO_EVAL), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout)
    assert set(scores) == EVAL_KEYS
    saved = json.loads((out / "eval_results.json").read_text())
    assert scores["exact_match"] == pytest.approx(saved["exact_match"], abs=0.03)
    assert scores["n"] == saved["n"]


def test_untrained_base_scores_zero(demo_run):
    """Zeroing every head gives the base model back; it knows none of the demo's answers."""
    out, _ = demo_run
    from hydra_edge.data.records import read_records
    from hydra_edge.inference.evaluate import evaluate
    from hydra_edge.inference.torch_engine import TorchEngine
    from hydra_edge.inference.trained import load_trained
    from hydra_edge.models.tiny import DEMO_EVAL

    trained = load_trained(out, device="cpu")
    for name, param in trained.model.named_parameters():
        if name.endswith("hydra_B"):
            param.data.zero_()
    engine = TorchEngine(trained.model, trained.tokenizer, trained.clusters)
    scores = evaluate(engine, read_records(DEMO_EVAL)[:20], 128, 8)
    assert scores["exact_match"] == 0.0


def test_chat_prompt_answer_on_stdout_routing_on_stderr(demo_run):
    out, _ = demo_run
    result = run_cli(
        "chat", "--adapter", str(out), "--prompt", "What is the capital of France?", "--max-new-tokens", "8"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Paris"
    assert "[cluster " in result.stderr and "gates h0=" in result.stderr


def test_chat_routes_on_the_whole_conversation_with_its_system_prompt(demo_run):
    """Training clusters a row on all its non-assistant text, and so does every engine: with a
    system prompt, chat must not route on the last message alone."""
    from cli_helpers import conversation_routed_by_its_system_prompt

    from hydra_edge.inference.protocol import Engine
    from hydra_edge.inference.torch_engine import TorchEngine

    out, _ = demo_run
    system, prompt, cluster = conversation_routed_by_its_system_prompt(out)
    result = run_cli("chat", "--adapter", str(out), "--system", system, "--prompt", prompt, "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"[cluster {cluster} | gates " in result.stderr, result.stderr[-500:]
    engine = TorchEngine.load(out, device="cpu")
    assert isinstance(engine, Engine)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    assert engine.route(messages) == cluster


def test_adapter_on_a_different_base_is_refused(demo_run, tmp_path):
    out, _ = demo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_edge.models.tiny import tiny_model_dir

    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(other)
    from hydra_edge.models.tiny import DEMO_EVAL

    result = run_cli("eval", "--adapter", str(out), "--data", str(DEMO_EVAL), "--model", str(other))
    assert_one_line_error(result, "fingerprint", str(other))

    # An unchanged copy of the base in another folder is the same base: accepted.
    same = tmp_path / "same-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir()).save_pretrained(same)
    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(same)
    result = run_cli(
        "chat",
        "--adapter",
        str(out),
        "--model",
        str(same),
        "--prompt",
        "What is the capital of Japan?",
        "--max-new-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Tokyo"


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
@pytest.mark.parametrize(
    "args, needle",
    [
        (["finetune", "--model", "./no/such/model", "--data", "x.jsonl"], "--model ./no/such/model"),
        (["finetune", "--data", "missing.jsonl"], "--data missing.jsonl"),
        (["finetune", "--rank", "abc"], "--rank"),
        (["finetune", "--rank", "0"], "--rank"),
        (["finetune", "--heads", "many"], "--heads"),
        (["finetune", "--quant", "int3"], "--quant"),
        (["finetune", "--targets", "nothing_like_this"], "--targets"),
        (["finetune", "--no-such-flag"], "--no-such-flag"),
        (["eval", "--adapter", "no-such-dir", "--data", "x.jsonl"], "x.jsonl"),
        (["chat", "--adapter", "no-such-dir", "--prompt", "hi"], "--adapter no-such-dir"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, needle, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert_one_line_error(result, needle)


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_bad_data_line_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{not json\n')
    result = run_cli("finetune", "--data", str(data), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert_one_line_error(result, "1 invalid row", "--skip-invalid")
    assert result.stderr.splitlines()[0].startswith(f"{data}:3: malformed JSON")


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_run_that_died_before_any_checkpoint_can_start_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    result = run_cli("finetune", "--out", str(out), "--max-steps", "2", "--heads", "2", "--seq-len", "64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_existing_run_is_not_overwritten(demo_run):
    out, _ = demo_run
    before = (out / "adapter_model.safetensors").read_bytes()
    result = run_cli("finetune", "--out", str(out), "--max-steps", "1")
    assert_one_line_error(result, "--resume")
    assert (out / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_yaml_config_with_flag_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\nheads: 2\nrank: 4\nquant: none\nseq-len: 64\n")
    result = run_cli("finetune", "--config", str(config), "--rank", "2", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    adapter = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert adapter["rank"] == 2 and adapter["heads"] == 2 and adapter["quant"] == "none"
    assert len((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) == 3


def test_yaml_unknown_key_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\nlearning_rate: 0.1\n")
    assert_one_line_error(run_cli("finetune", "--config", str(config)), "learning_rate")
    config.write_text("rank: eight\n")
    assert_one_line_error(run_cli("finetune", "--config", str(config)), "rank")


def test_help_does_not_import_the_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys; from hydra_edge.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_help_is_fast_and_module_entry_works():
    result = run_cli("--help")
    assert result.returncode == 0 and "finetune" in result.stdout
    result = run_cli("finetune", "--help")
    assert "--heads" in result.stdout and "--resume" in result.stdout


def test_training_rows_keep_their_cluster_ids(demo_run):
    out, _ = demo_run
    from hydra_edge.models.tiny import DEMO_TRAIN

    clusters = json.loads((out / "clusters.json").read_text())
    rows = DEMO_TRAIN.read_text().splitlines()
    assert len(clusters["labels"]) == len(rows)
    assert sorted(set(clusters["labels"])) == list(range(clusters["k"]))
    assert [clusters["labels"].count(c) for c in range(clusters["k"])] == clusters["sizes"]


def test_chat_repl_streams_and_keeps_going(demo_run):
    import subprocess
    import sys

    out, _ = demo_run
    result = subprocess.run(
        [sys.executable, "-m", "hydra_edge", "chat", "--adapter", str(out), "--max-new-tokens", "8"],
        input="What is the capital of Italy?\n/reset\nWrite the number seven in digits.\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line.strip() for line in result.stdout.replace("> ", "\n").splitlines() if line.strip()]
    assert answers == ["Rome", "7"], result.stdout
    assert result.stderr.count("[cluster ") == 2


def test_every_finetune_setting_is_a_finetune_option():
    """A FinetuneConfig field without its Typer option (--router was one) can be set in YAML only."""
    import inspect

    from hydra_edge.cli.app import app
    from hydra_edge.training.config import config_fields

    (finetune,) = [c.callback for c in app.registered_commands if c.name == "finetune"]
    options = set(inspect.signature(finetune).parameters) - {"config"}
    assert options == set(config_fields())
