"""`serve`'s settings are written once (hydra_edge/server/settings.py): its options are generated
from the fields, and the fields' checks hold whoever builds the settings (no server)."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from hydra_edge.errors import UserError
from hydra_edge.server.cli import serve_command
from hydra_edge.server.settings import BackendChoice, ServeSettings


def _serve_options() -> dict:
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)  # two commands: `serve` stays a subcommand
    command = typer.main.get_command(app).commands["serve"]
    return {p.opts[0]: p for p in command.params}


def test_every_field_is_an_option_with_its_default_and_help():
    options = _serve_options()
    fields = [*dataclasses.fields(BackendChoice), *dataclasses.fields(ServeSettings)]
    assert list(options) == ["--" + f.name.replace("_", "-") for f in fields]  # same order as --help shows
    for f in fields:
        option = options["--" + f.name.replace("_", "-")]
        assert option.default == f.default and option.help == f.metadata["help"], f.name
    assert options["--api-key"].envvar == "HYDRA_EDGE_API_KEY"
    assert options["--upstream-api-key"].envvar == "HYDRA_EDGE_UPSTREAM_API_KEY"


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"port": 70000}, "--port 70000: use 1-65535 (0 picks a free port)"),
        ({"max_concurrency": 0}, "--max-concurrency 0: must be >= 1"),
        ({"max_queue": -1}, "--max-queue -1: must be >= 0"),
        ({"max_body_mb": 0.5}, "--max-body-mb 0.5: must be >= 1"),
        ({"host": "0.0.0.0"}, "--host 0.0.0.0 makes the API reachable"),
        ({"api_key": " "}, "--api-key: empty"),
    ],
)
def test_settings_refuse_what_the_command_refuses_however_they_are_built(change, needle):
    with pytest.raises(UserError) as refused:
        ServeSettings(**change)
    assert str(refused.value).startswith(needle)


def test_derived_settings():
    settings = ServeSettings(max_body_mb=1.5, max_concurrency=4, max_queue=16)
    assert settings.max_body_bytes == 1_572_864 and ServeSettings().max_body_bytes == 4 * 1024 * 1024
    one = settings.one_generation_at_a_time()
    assert (one.max_concurrency, one.max_queue) == (1, 19)  # the other three slots wait in the queue
    with pytest.raises(UserError, match="one of --onnx DIR, --gguf DIR"):
        BackendChoice()
    assert BackendChoice(onnx="x", upstream="http://127.0.0.1:9/v1").upstream.startswith("http://")
