"""Serving a GGUF export: `serve --gguf` (llama.cpp in this process, the routed cluster's adapter
switched on per request), and `serve --upstream` in front of llama.cpp: the export's own server
config (llama-server.json: one model name per cluster, the base with that cluster's adapter) run
by llama-cpp-python's OpenAI-compatible server on loopback, the routing proxy in front of it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from cli_helpers import free_port
from serverhelpers import API_KEY, launch
from test_server import demo_prompts_by_cluster

from hydra_edge.exporters.gguf_layout import SERVER_CONFIG


@pytest.fixture(scope="module")
def llama_server(gguf_export, tmp_path_factory):
    """llama-cpp-python's server on the export's config, on a free loopback port."""
    config = json.loads((gguf_export / SERVER_CONFIG).read_text())
    config["port"] = free_port()
    path = tmp_path_factory.mktemp("llama") / SERVER_CONFIG
    path.write_text(json.dumps(config))
    log = path.with_suffix(".log")
    # serve-llama.sh's command, with this config
    command = [sys.executable, "-m", "hydra_edge.exporters.llama_server", str(gguf_export), "--config", str(path)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{config['port']}/v1"
    deadline, up = time.monotonic() + 120, False
    while not up and time.monotonic() < deadline:
        try:
            up = httpx.get(f"{url}/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            time.sleep(0.5)
        assert process.poll() is None, log.read_text()[-2000:]
    assert up, log.read_text()[-2000:]
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def llama_proxy(llama_server, gguf_export, tmp_path_factory):
    server = launch(tmp_path_factory.mktemp("proxy"), "--gguf", str(gguf_export), "--upstream", llama_server)
    yield server
    server.stop()


def test_auto_requests_reach_llama_cpp_with_their_clusters_adapter(llama_proxy, llama_server, gguf_export):
    from openai import OpenAI

    from hydra_edge.exporters.gguf_chat import GgufChat

    direct_client = OpenAI(base_url=llama_server, api_key="unused", max_retries=0)
    engine = GgufChat(gguf_export)
    answers = {}
    for cluster, question in list(demo_prompts_by_cluster(gguf_export).items())[:3]:
        messages = [{"role": "user", "content": question}]
        raw = llama_proxy.client().chat.completions.with_raw_response.create(
            model="auto", messages=messages, temperature=0, max_tokens=16
        )
        reply = raw.parse()
        assert raw.headers["x-hydra-cluster"] == str(cluster)
        assert reply.model == f"cluster_{cluster}"
        direct = direct_client.chat.completions.create(
            model=f"cluster_{cluster}", messages=messages, temperature=0, max_tokens=16
        )
        assert reply.choices[0].message.content == direct.choices[0].message.content
        # llama.cpp's server rendered the training template and applied that cluster's adapter:
        # the same answer as hydra-edge's own llama.cpp engine pinned to the cluster
        assert reply.choices[0].message.content.strip() == engine.answer(messages, max_new_tokens=16)[1]
        answers[cluster] = reply.choices[0].message.content
    assert len(answers) >= 2


def test_serve_gguf_answers_with_the_routed_clusters_adapter(gguf_export, tmp_path):
    from hydra_edge.exporters.gguf_chat import GgufChat

    server = launch(tmp_path, "--gguf", str(gguf_export), "--api-key", API_KEY)
    try:
        engine = GgufChat(gguf_export)
        for cluster, question in list(demo_prompts_by_cluster(gguf_export).items())[:2]:
            messages = [{"role": "user", "content": question}]
            raw = server.client().chat.completions.with_raw_response.create(
                model="auto", messages=messages, temperature=0, max_tokens=16
            )
            assert raw.headers["x-hydra-cluster"] == str(cluster)
            assert raw.parse().choices[0].message.content == engine.answer(messages, max_new_tokens=16)[1]
        models = {m.id for m in server.client().models.list()}
        assert models == {"auto", "base", *(f"cluster_{c}" for c in engine.forceable_clusters())}
    finally:
        server.stop()
