"""Hostile clients and a hostile upstream: huge prompts, half-open connections, unknown fields,
an upstream that hangs, and SIGTERM in the middle of all that. Each server is a real `hydra-edge
serve` subprocess; most are the routing proxy (a router and no model, so they start in half a
second) in front of FakeUpstream, the rest serve the tiny export (slow)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serverhelpers import API_KEY, launch
from test_load import HEALTH_POLLER

KEY = {"Authorization": f"Bearer {API_KEY}"}
MEGABYTE_PROMPT = "hello world and some more words " * (1024 * 1024 // 32)  # 1 MB, a few 100k tokens


def proxy(tmp_path_factory, router_dir, upstream, *args: str):
    return launch(
        tmp_path_factory.mktemp("proxy"), "--adapter", str(router_dir), "--upstream", upstream.url,
        "--api-key", API_KEY, *args,
    )  # fmt: skip


def chat(server, content: str, timeout: float = 60, **fields) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(f"{server.url}/chat/completions", json=body, headers=KEY, timeout=timeout)


def health_seconds(server) -> float:
    started = time.monotonic()
    assert httpx.get(f"{server.root}/health", timeout=10).status_code == 200
    return time.monotonic() - started


def stop_seconds(server) -> float:
    """Seconds from SIGTERM to the process's exit."""
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
        seconds = time.monotonic() - started
    finally:
        server.stop()
    print(f"stopped {seconds:.2f} s after SIGTERM")
    return seconds


def six_megabyte_prompts(server) -> tuple[list[int], list[tuple[float, int]]]:
    """Six 1 MB prompts at once while a separate process polls /health every 20 ms: (the six
    statuses, (seconds, running) per poll)."""
    poller = subprocess.Popen(
        [sys.executable, "-c", HEALTH_POLLER, f"{server.root}/health"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(0.5)  # the poller is up first
    try:
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: chat(server, MEGABYTE_PROMPT, max_tokens=4), range(6)))
    finally:
        output, _ = poller.communicate("", timeout=30)
    polls = [(float(s), int(r)) for s, r, _ in (line.split() for line in output.splitlines())]
    return [r.status_code for r in replies], polls


def address(server) -> tuple[str, int]:
    host, port = server.root.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def open_half_requests(server, count: int) -> list[socket.socket]:
    """`count` connections that each send the start of a request's headers and then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(address(server), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/js")
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes the connection within `within` seconds (EOF or a reset)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


# --- the routing proxy (fast) ---


def assert_half_open_closed(server, count: int, within: float, threads: int) -> None:
    """`count` connections that send part of their headers: /health answers under 1 s beside
    them, and the server closes every one within `within` seconds."""
    sockets = open_half_requests(server, count)
    try:
        started = time.monotonic()
        slowest = max(health_seconds(server) for _ in range(5))
        assert slowest < 1.0, f"/health took {slowest:.2f} s beside {count:,} half-open connections"
        with ThreadPoolExecutor(threads) as pool:
            closed = list(pool.map(lambda s: closed_by_server(s, within), sockets))
        assert all(closed), f"{closed.count(False)} of {count:,} half-open connections still open"
        assert time.monotonic() - started < within
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def quick_proxy(tmp_path_factory, router_dir, fake_upstream):
    """Headers and bodies must arrive within 2 s; the upstream may stay silent 6 s; one slot and
    no queue, so a slot that is not freed shows as a 429."""
    server = proxy(tmp_path_factory, router_dir, fake_upstream, "--client-timeout", "2", "--upstream-read-timeout",
                   "6", "--max-concurrency", "1", "--max-queue", "0")  # fmt: skip
    yield server
    server.stop()


@pytest.mark.parametrize(
    "raw, status, param, words",
    [
        (b'{"model": "auto", "seed": 18446744073709551616, "messages": [{"role": "user", "content": "hi"}]}', 400,
         "seed", "use 0 to 2147483647"),
        (b"[" * 100_000, 400, None, "nests too deep"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content",
         "not valid UTF-8 text"),
        (b'{"model": "\\udc00", "messages": [{"role": "user", "content": "hi"}]}', 400, "model", "not valid UTF-8"),
        (b'{"model": "auto", "n": true, "messages": [{"role": "user", "content": "hi"}]}', 400, "n", "`n`"),
        (b'{"model": "auto", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}', 400, None,
         "NaN is not a JSON number"),
    ],
    ids=["seed 2**64", "100k nested [", "lone surrogate", "lone surrogate in model", "n true", "NaN"],
)  # fmt: skip
def test_hostile_bodies_are_400_naming_the_field_and_never_forwarded(
    quick_proxy, fake_upstream, raw, status, param, words
):
    received = len(fake_upstream.bodies)
    reply = httpx.post(f"{quick_proxy.url}/chat/completions", content=raw, headers=KEY, timeout=30)
    assert reply.status_code == status, reply.text[:300]
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert len(fake_upstream.bodies) == received  # refused here, never forwarded


def test_the_upstream_gets_only_the_fields_this_server_knows(quick_proxy, fake_upstream):
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hello", "lora_request": {"lora_path": "/etc"}}],
        "max_tokens": 5, "stop": "\n", "seed": 7, "stream": False,
        "logits_processors": ["evil.module:Processor"], "lora_request": {"lora_name": "x", "lora_path": "/tmp/x"},
        "guided_json": {}, "user": "ann", "metadata": {"a": 1}, "n": 1, "presence_penalty": 0.0,
    }  # fmt: skip
    reply = httpx.post(f"{quick_proxy.url}/chat/completions", json=body, headers=KEY, timeout=30)
    assert reply.status_code == 200, reply.text
    assert fake_upstream.bodies[-1] == {
        "model": "cluster_0",  # routed: "hello" leans to cluster 0 in write_router's router
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5, "stop": ["\n"], "seed": 7, "stream": False,
    }  # fmt: skip


def test_a_client_that_leaves_a_hanging_upstream_frees_its_slot(quick_proxy, fake_upstream):
    fake_upstream.hung_up.clear()
    with pytest.raises(httpx.ReadTimeout):
        chat(quick_proxy, "HANG", timeout=0.5)
    left = time.monotonic()
    assert fake_upstream.hung_up.wait(4), "the upstream request was not cancelled"
    assert time.monotonic() - left < 4  # before --upstream-read-timeout (6 s) could have ended it
    while httpx.get(f"{quick_proxy.root}/health").json()["running"] and time.monotonic() - left < 4:
        time.sleep(0.05)
    assert chat(quick_proxy, "hello").status_code == 200  # the one slot is free: no 429


def test_an_upstream_that_never_answers_is_a_504(quick_proxy, fake_upstream):
    started = time.monotonic()
    reply = chat(quick_proxy, "HANG")
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["type"] == "upstream_error" and "--upstream-read-timeout" in reply.json()["error"][
        "message"]  # fmt: skip
    assert 5 < time.monotonic() - started < 30
    assert chat(quick_proxy, "hello").status_code == 200


def test_half_open_connections_are_closed_and_health_answers_meanwhile(quick_proxy):
    assert_half_open_closed(quick_proxy, 300, within=8, threads=32)  # --client-timeout 2, not uvicorn's never
    # Complete headers, then a body that never comes: a 408 after --client-timeout.
    sock = socket.create_connection(address(quick_proxy), timeout=10)
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    sock.settimeout(10)
    assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
    sock.close()
    assert quick_proxy.process.poll() is None


def test_six_megabyte_prompts_leave_health_answering_on_the_proxy(tmp_path_factory, router_dir, fake_upstream):
    """Routing a 1 MB prompt takes half a second of CPU: on worker threads, not the event loop."""
    server = proxy(tmp_path_factory, router_dir, fake_upstream)
    try:
        statuses, polls = six_megabyte_prompts(server)
        assert statuses == [200] * 6
        assert any(running for _, running in polls), "no /health poll landed while the prompts were routed"
        slowest = max(seconds for seconds, _ in polls)
        print(f"{len(polls)} health polls, slowest {slowest:.3f} s")
        assert slowest < 1.0, f"/health took {slowest:.2f} s while 6 x 1 MB prompts were routed"
    finally:
        server.stop()


@pytest.mark.slow  # serve's own test below covers it; this one would add 6 s to the fast suite
def test_sigterm_stops_the_proxy_within_5_s_during_megabyte_prompts(tmp_path_factory, router_dir, fake_upstream):
    server = proxy(tmp_path_factory, router_dir, fake_upstream)
    try:
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(chat, server, MEGABYTE_PROMPT)
            time.sleep(0.5)  # the bodies are in and being routed
            assert stop_seconds(server) < 5
    finally:
        server.stop()


def test_sigterm_stops_the_proxy_within_5_s_with_hundreds_of_half_open_connections(
    tmp_path_factory, router_dir, fake_upstream
):
    server = proxy(tmp_path_factory, router_dir, fake_upstream)
    sockets = open_half_requests(server, 300)
    try:
        assert stop_seconds(server) < 5
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.slow
def test_3000_half_open_connections(tmp_path_factory, router_dir, fake_upstream):
    """3,000 connections that send part of their headers: /health answers
    beside them, the server closes them after --client-timeout, and SIGTERM still stops it."""
    server, sockets = proxy(tmp_path_factory, router_dir, fake_upstream, "--client-timeout", "10"), []
    try:
        assert_half_open_closed(server, 3000, within=20, threads=64)
        sockets = open_half_requests(server, 3000)
        assert stop_seconds(server) < 5
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


# --- serving the tiny export (slow) ---


def test_six_megabyte_prompts_leave_health_answering(adapter_export, tmp_path_factory):
    """Routing, rendering and tokenizing 1 MB (about a second each) run on the worker threads,
    in an admission slot: /health answers throughout, and each prompt is refused as too long."""
    server = launch(tmp_path_factory.mktemp("big"), "--onnx", str(adapter_export), "--api-key", API_KEY)
    try:
        statuses, polls = six_megabyte_prompts(server)
        assert statuses == [400] * 6  # context_length_exceeded, after tokenizing
        assert any(running for _, running in polls), "no /health poll landed while the prompts were tokenized"
        assert max(running for _, running in polls) <= 4  # preparing counts as running: --max-concurrency
        slowest = max(seconds for seconds, _ in polls)
        print(f"{len(polls)} health polls, slowest {slowest:.3f} s")
        assert slowest < 1.0, f"/health took {slowest:.2f} s while 6 x 1 MB prompts were tokenized"
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


def test_sigterm_stops_serve_within_5_s_during_megabyte_prompts(adapter_export, tmp_path_factory):
    server = launch(tmp_path_factory.mktemp("big"), "--onnx", str(adapter_export), "--api-key", API_KEY)
    try:
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(chat, server, MEGABYTE_PROMPT)
            time.sleep(1)  # the bodies are in and being tokenized
            assert httpx.get(f"{server.root}/health").json()["running"] > 0
            assert stop_seconds(server) < 5
    finally:
        server.stop()


def test_a_seed_at_the_top_of_the_range_generates(api_server):
    for seed in (0, 2**31 - 1):
        reply = chat(api_server, "hello", max_tokens=4, temperature=1.0, seed=seed)
        assert reply.status_code == 200, reply.text
    assert json.loads(chat(api_server, "hello", seed=2**31).text)["error"]["param"] == "seed"


# --- a chat template that never finishes (slow: serves the tiny adapter) ---

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"


@pytest.fixture
def hanging_template_server(trained_adapter, tmp_path_factory):
    import shutil

    adapter = tmp_path_factory.mktemp("hang") / "adapter"
    shutil.copytree(trained_adapter, adapter, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "chat_template": NESTED_LOOPS}))
    server = launch(tmp_path_factory.mktemp("hang-serve"), "--adapter", str(adapter), "--api-key", API_KEY)
    yield server
    server.stop()


def test_a_template_that_never_finishes_is_a_400_and_health_answers_meanwhile(hanging_template_server):
    server = hanging_template_server
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(chat, server, "Capital of Peru?") for _ in range(3)]
        polls = []
        while not all(r.done() for r in replies):
            polls.append(health_seconds(server))
            time.sleep(0.05)
    for reply in replies:
        answer = reply.result()
        assert answer.status_code == 400, answer.text
        assert "chat template did not finish" in answer.json()["error"]["message"]
    assert polls and max(polls) < 1.0, f"/health took {max(polls):.2f} s while templates rendered"
    assert "Traceback" not in server.log.read_text()


def test_sigterm_stops_serve_within_5_s_while_a_template_renders(hanging_template_server):
    server = hanging_template_server
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(chat, server, "Capital of Peru?")
        time.sleep(0.5)  # the renders are under way
        assert httpx.get(f"{server.root}/health").json()["running"] > 0
        assert stop_seconds(server) < 5
