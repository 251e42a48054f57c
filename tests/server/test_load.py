"""Load: 32 streaming requests at once against two slots and a queue of four. Each completes or
gets a 429 with Retry-After, none fails, /health answers throughout, and a client that hangs up
mid-stream frees its slot at once."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

LONG = {"ignore_eos": True}  # vLLM's extension: generate exactly max_tokens tokens


def stream_one(server, max_tokens: int = 48) -> str:
    """'done' (the whole stream arrived) or 'busy' (429); anything else raises."""
    try:
        stream = server.client().chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "Count to fifty."}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=LONG,
        )
        chunks = list(stream)
    except openai.RateLimitError as exc:
        assert exc.response.headers["retry-after"] == "1"
        return "busy"
    assert chunks[-1].usage.completion_tokens == max_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    return "done"


def wait_until_idle(server, timeout: float) -> float:
    """Seconds until no request holds a slot or waits; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = httpx.get(f"{server.root}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"still busy after {timeout} s: {health}")


# Polls /health every 20 ms from its own process (the 32 client threads here would otherwise
# slow the poller itself) and prints "seconds running waiting" per poll until stdin closes.
HEALTH_POLLER = """
import sys, threading, time, httpx
url, done = sys.argv[1], threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
with httpx.Client(timeout=10) as client:
    while not done.is_set():
        started = time.monotonic()
        health = client.get(url).json()
        print(time.monotonic() - started, health["running"], health["waiting"], flush=True)
        time.sleep(0.02)
"""


def test_32_concurrent_streams_complete_or_get_429_and_health_answers(busy_server):
    poller = subprocess.Popen(
        [sys.executable, "-c", HEALTH_POLLER, f"{busy_server.root}/health"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # the poller is up before the load starts
    try:
        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(lambda _: stream_one(busy_server), range(32)))
    finally:
        output, _ = poller.communicate("", timeout=30)
    polls = [(float(s), int(r), int(w)) for s, r, w in (line.split() for line in output.splitlines())]
    assert outcomes.count("done") + outcomes.count("busy") == 32
    assert outcomes.count("done") >= 6  # two slots and four places in the queue
    assert outcomes.count("busy") >= 1
    assert any(running > 0 for _, running, _ in polls), "no /health poll landed while requests were generating"
    slowest = max(seconds for seconds, _, _ in polls)
    assert slowest < 2.0, f"/health took {slowest:.2f} s"  # the event loop never stalled behind generation
    assert max(running for _, running, _ in polls) <= 2
    assert max(waiting for _, _, waiting in polls) <= 4
    print(f"{len(polls)} health polls, slowest {slowest:.3f} s; {outcomes.count('done')} done")
    wait_until_idle(busy_server, 10)
    assert busy_server.metric("hydra_edge_requests_total", endpoint="/v1/chat/completions", model="auto",
                              status="429") == outcomes.count("busy")  # fmt: skip
    assert busy_server.process.poll() is None


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(torch_server):
    """On the PyTorch backend, whose tiny model generates slowly enough (milliseconds per token)
    that a finished generation cannot pass for a cancelled one; the ONNX export writes all 480
    tokens before a client has read three. The cancellation path is the same for both."""
    busy_server = torch_server
    wait_until_idle(busy_server, 10)
    tokens_before = busy_server.metric("hydra_edge_completion_tokens_total")
    stream = busy_server.client().chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Go on and on."}],
        max_tokens=480,
        stream=True,
        extra_body=LONG,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    assert httpx.get(f"{busy_server.root}/health").json()["running"] == 1
    stream.close()  # hang up
    freed_after = wait_until_idle(busy_server, 5)
    generated = busy_server.metric("hydra_edge_completion_tokens_total") - tokens_before
    assert generated < 480, "the generation ran to the end after the client left"
    assert freed_after < 2.0
    assert stream_one(busy_server, max_tokens=8) == "done"  # the slot serves the next request
