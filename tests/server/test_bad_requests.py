"""Malformed requests, each with the status and error body the README documents; the server
answers every one and stays up. Plain HTTP (httpx), since a client library would refuse to send
most of these."""

from __future__ import annotations

import json

import httpx
import pytest
from serverhelpers import API_KEY

KEY = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


def chat(**fields):
    return {"model": "auto", "messages": HELLO, **fields}


# (case, method, path, headers, body: dict/list (JSON) or bytes (raw), status, error code, words in the message)
CASES = [
    ("no API key", "POST", CHAT, {}, chat(), 401, "invalid_api_key", "API key"),
    ("wrong API key", "POST", CHAT, {"Authorization": "Bearer nope"}, chat(), 401, "invalid_api_key", "API key"),
    ("not a bearer token", "POST", CHAT, {"Authorization": API_KEY}, chat(), 401, "invalid_api_key", "Bearer"),
    ("malformed JSON", "POST", CHAT, KEY, b'{"model": "auto", "messages": [', 400, None, "not valid JSON"),
    ("body is not an object", "POST", CHAT, KEY, [chat()], 400, None, "JSON object"),
    ("messages missing", "POST", CHAT, KEY, {"model": "auto"}, 400, None, "`messages`: required"),
    ("messages empty", "POST", CHAT, KEY, chat(messages=[]), 400, None, "`messages`"),
    ("model missing", "POST", CHAT, KEY, {"messages": HELLO}, 400, None, "`model`: required"),
    ("model not a string", "POST", CHAT, KEY, chat(model=3), 400, None, "`model`"),
    ("unknown model", "POST", CHAT, KEY, chat(model="gpt-4o"), 404, "model_not_found", "cluster_0"),
    ("unknown cluster", "POST", CHAT, KEY, chat(model="cluster_99"), 404, "model_not_found", "/v1/models"),
    ("bad role", "POST", CHAT, KEY, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, None,
     "`messages.0.role`"),
    ("tool turn", "POST", CHAT, KEY, chat(messages=[{"role": "tool", "content": "42"}]), 400, None,
     "`messages.0.role`"),
    ("content a number", "POST", CHAT, KEY, chat(messages=[{"role": "user", "content": 5}]), 400, None,
     "`messages.0.content`"),
    ("content missing", "POST", CHAT, KEY, chat(messages=[{"role": "user"}]), 400, None, "`messages.0.content`"),
    ("image content part", "POST", CHAT, KEY,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, None,
     "`messages.0.content.0.type`"),
    ("max_tokens negative", "POST", CHAT, KEY, chat(max_tokens=-5), 400, None, "`max_tokens`"),
    ("max_tokens zero", "POST", CHAT, KEY, chat(max_tokens=0), 400, None, "`max_tokens`"),
    ("max_tokens above the cap", "POST", CHAT, KEY, chat(max_tokens=10**9), 400, None, "--max-tokens-cap"),
    ("max_tokens a string", "POST", CHAT, KEY, chat(max_tokens="10"), 400, None, "`max_tokens`"),
    ("temperature too high", "POST", CHAT, KEY, chat(temperature=5), 400, None, "`temperature`"),
    ("top_p zero", "POST", CHAT, KEY, chat(top_p=0), 400, None, "`top_p`"),
    ("stream not a boolean", "POST", CHAT, KEY, chat(stream="yes"), 400, None, "`stream`"),
    ("seed a float", "POST", CHAT, KEY, chat(seed=1.5), 400, None, "`seed`"),
    ("seed 2**64", "POST", CHAT, KEY, chat(seed=2**64), 400, None, "`seed`: out of range; use 0 to 2147483647"),
    ("seed past 32 bits", "POST", CHAT, KEY, chat(seed=2**31), 400, None, "use 0 to 2147483647"),
    ("100,000 nested [", "POST", CHAT, KEY, b"[" * 100_000, 400, None, "the body nests too deep"),
    ("a lone surrogate", "POST", CHAT, KEY, b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}',
     400, None, "`messages.0.content` is not valid UTF-8 text"),
    ("NaN", "POST", CHAT, KEY, b'{"model": "auto", "messages": [], "top_p": NaN}', 400, None, "not a JSON number"),
    ("n a boolean", "POST", CHAT, KEY, chat(n=True), 400, None, "`n` is not supported"),
    ("five stop strings", "POST", CHAT, KEY, chat(stop=["a", "b", "c", "d", "e"]), 400, None, "at most 4"),
    ("an empty stop string", "POST", CHAT, KEY, chat(stop=[""]), 400, None, "must not be empty"),
    ("n above 1", "POST", CHAT, KEY, chat(n=2), 400, None, "`n` is not supported"),
    ("tools", "POST", CHAT, KEY, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None,
     "`tools` is not supported"),
    ("logprobs", "POST", CHAT, KEY, chat(logprobs=True), 400, None, "`logprobs` is not supported"),
    ("prompt longer than the context", "POST", CHAT, KEY,
     chat(messages=[{"role": "user", "content": "word " * 3000}]), 400, "context_length_exceeded", "context"),
    ("body over the size limit", "POST", CHAT, KEY,
     chat(messages=[{"role": "user", "content": "x" * (5 * 1024 * 1024)}]), 413, None, "larger than"),
    ("two prompts at once", "POST", "/v1/completions", KEY, {"model": "auto", "prompt": ["a", "b"]}, 400, None,
     "one prompt"),
    ("an empty prompt", "POST", "/v1/completions", KEY, {"model": "auto", "prompt": ""}, 400, None, "empty"),
    ("unknown endpoint", "POST", "/v1/embeddings", KEY, {"model": "auto", "input": "x"}, 404, None, "no such endpoint"),
    ("wrong method", "GET", CHAT, KEY, None, 405, None, "not allowed"),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, headers, body, status, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_its_status_and_an_openai_error_body(api_server, method, path, headers, body, status, code,
                                                               words):  # fmt: skip
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    reply = httpx.request(
        method, api_server.root + path, headers={"Content-Type": "application/json", **headers}, content=content,
        timeout=60,
    )  # fmt: skip
    assert reply.status_code == status, reply.text[:500]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["code"] == code
    assert words in error["message"], error["message"]
    if status == 401:
        assert reply.headers["www-authenticate"] == "Bearer"


def test_the_server_is_up_after_every_bad_request(api_server):
    assert len(CASES) >= 15
    assert httpx.get(f"{api_server.root}/health").json()["status"] == "ok"
    assert api_server.process.poll() is None
    assert "Traceback" not in api_server.log.read_text()
    answer = api_server.client().chat.completions.create(model="auto", messages=HELLO, max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")
