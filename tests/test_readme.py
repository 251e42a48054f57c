"""README and CI stay in step: .ci/run runs the README's setup and test commands."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    dev = readme.split("## Development", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    setup, *checks = dev
    assert setup == "bash scripts/setup.sh" and "bash scripts/setup.sh" in ci.splitlines()
    assert any("ruff check" in line for line in checks) and checks[-1].startswith(".venv/bin/python -m pytest")
    for line in checks:  # the lint and the test command, each run by CI as written
        assert line in ci.splitlines(), f"{line!r} not a line of .ci/run"


def test_readme_names_every_cli_command():
    from hydra_edge.cli.app import app

    readme = (ROOT / "README.md").read_text()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert f"hydra-edge {name}" in readme, name
