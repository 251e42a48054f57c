"""One launched UI per test session, shared by the API and browser tests (launching and the
first training are the slow parts), plus a trained run and an export made through its API."""

from __future__ import annotations

import os

import pytest
from cli_helpers import free_port
from uihelpers import QUICK, UPLOAD_LIMIT_MB, wait_until_done

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


class UIServer:
    """The launched app: its URL, its server-side context (workspace, job manager) and clients."""

    def __init__(self, demo, url: str) -> None:
        self.demo, self.url = demo, url
        self.ctx = demo.hydra
        self.workspace = self.ctx.ws.root

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    pytest.importorskip("gradio")
    from hydra_edge.ui.app import create_ui, launch

    workspace = tmp_path_factory.mktemp("ui-workspace")
    demo = create_ui(workspace, max_upload_mb=UPLOAD_LIMIT_MB)
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    server = UIServer(demo, url)
    yield server
    server.ctx.jobs.shutdown(timeout=30)
    demo.close()


@pytest.fixture(scope="session")
def client(ui_server):
    return ui_server.client()


@pytest.fixture(scope="session")
def trained_run(ui_server, client) -> str:
    """A 20-step tiny run started through the API; returns its workspace folder (runs/<name>)."""
    # batch 16 (the tiny preset's): after 20 steps the adapter already answers instead of stopping at once
    status = client.predict(
        data="data/demo/train.jsonl",
        max_steps=20,
        run_name="api-20",
        **{**QUICK, "batch_size": 16},
        api_name="/start_training",
    )
    assert status["state"] == "running", status
    status = wait_until_done(client)
    assert status["state"] == "finished", status["message"]
    return status["adapter"]


@pytest.fixture(scope="session")
def exported(ui_server, client, trained_run) -> dict:
    """An `adapters`-mode fp32 export of the trained run, made through the API; its result dict."""
    result, *_ = client.predict(
        adapter=trained_run, mode="adapters", precision="fp32", name="api-export", api_name="/export"
    )
    return result
