"""Servers for the tests: `hydra-edge serve` on the tiny export, launched once per session or module."""

from __future__ import annotations

import pytest
from serverhelpers import API_KEY, FakeUpstream, launch, write_router


@pytest.fixture(scope="session")
def api_server(adapter_export, tmp_path_factory):
    """The export behind an API key, four requests at a time."""
    server = launch(tmp_path_factory.mktemp("serve"), "--onnx", str(adapter_export), "--api-key", API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def busy_server(adapter_export, tmp_path_factory):
    """Two slots and four places in the queue: load beyond six gets 429."""
    args = ("--onnx", str(adapter_export), "--api-key", API_KEY, "--max-concurrency", "2", "--max-queue", "4")
    server = launch(tmp_path_factory.mktemp("busy"), *args)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy_server(api_server, adapter_export, tmp_path_factory):
    """A routing proxy whose upstream is api_server (real HTTP both ways)."""
    args = ("--onnx", str(adapter_export), "--upstream", api_server.url, "--upstream-api-key", API_KEY)
    server = launch(tmp_path_factory.mktemp("proxy"), *args, "--api-key", API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def torch_server(trained_adapter, tmp_path_factory):
    """The adapter served with PyTorch (one generation at a time), one place in the queue."""
    args = ("--adapter", str(trained_adapter), "--api-key", API_KEY, "--max-concurrency", "1", "--max-queue", "1")
    server = launch(tmp_path_factory.mktemp("torch"), *args)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def router_dir(tmp_path_factory):
    """A request router alone (no model): what a proxy needs."""
    return write_router(tmp_path_factory.mktemp("router"))


@pytest.fixture(scope="module")
def fake_upstream():
    upstream = FakeUpstream()
    yield upstream
    upstream.close()
