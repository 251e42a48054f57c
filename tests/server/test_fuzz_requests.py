"""Hostile requests from a fixed seed, against `serve` (the tiny export) and the `--upstream` proxy
(FakeUpstream behind it): wrong types for every field, numbers at and past every edge, deep or
truncated JSON, invalid UTF-8 and lone surrogates, huge strings within the body limit, unknown
fields, absurd stop lists, streaming, odd content types, paths and methods. Every answer must be
2xx or 4xx (a 4xx in OpenAI's error shape, a stream without a server error in it), and /health
must answer within a second after each."""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter

import httpx
import pytest
from serverhelpers import API_KEY, launch

KEY = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]

# A valid value of each field the endpoints read or refuse by name.
VALID = {
    "model": "auto", "max_tokens": 4, "max_completion_tokens": 4, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"],
    "seed": 3, "stream": False, "stream_options": {"include_usage": True}, "ignore_eos": False, "n": 1,
    "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
    "tools": [], "functions": [], "tool_choice": "none", "response_format": {"type": "text"}, "best_of": 1,
    "echo": False, "suffix": "", "user": "u", "metadata": {},
}  # fmt: skip
LONG_DIGITS = "9" * 5000  # past Python's 4300-digit int limit: a JSON literal, not a Python value


def nested(depth: int, leaf: object = 0) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# Values of every type and edge; strings starting with RAW: are spliced into the JSON text as is.
HOSTILE = [
    None, True, False, 0, -1, 1, 2, 2**31 - 1, 2**31, 2**63, 2**64, -(2**64), 10**30, 0.5, -0.0, 1.0, 1.5, 1e-300,
    1e308, "RAW:1e400", "RAW:-1e400", "RAW:" + LONG_DIGITS, "RAW:NaN", "RAW:Infinity", "", "auto", "1", "true",
    "\ud800", "x" * 5000, "\u0000", "é🙂", [], [1], ["a"], [None], [[]], {}, {"a": 1}, {"type": "text"},
    nested(50), "RAW:" + "[" * 500 + "]" * 500, ["a"] * 500,
]  # fmt: skip

STRUCTURAL = [
    ("deep [", b"[" * 100_000),
    ("deep {", b'{"a":' * 30_000),
    ("deep but parsable", b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "metadata": '
     + b"[" * 800 + b"]" * 800 + b"}"),
    ("truncated", json.dumps({"model": "auto", "messages": HELLO})[:-7].encode()),
    ("truncated string", b'{"model": "auto", "messages": [{"role": "user", "content": "hel'),
    ("empty", b""),
    ("whitespace", b"  \n "),
    ("null", b"null"),
    ("a list", json.dumps([{"model": "auto", "messages": HELLO}]).encode()),
    ("a string", b'"hello"'),
    ("a number", b"42"),
    ("invalid UTF-8", b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}'),
    ("overlong UTF-8", b'{"model": "auto", "messages": [{"role": "user", "content": "\xc0\xaf"}]}'),
    ("raw surrogate bytes", '{"model": "auto", "messages": [{"role": "user", "content": "\ud800"}]}'.encode(
        "utf-8", "surrogatepass")),
    ("escaped lone surrogate", b'{"model": "auto", "messages": [{"role": "user", "content": "a\\udfff"}]}'),
    ("surrogate in a key", b'{"model": "auto", "messages": [{"role": "user", "content": "a"}], "\\ud800": 1}'),
    ("UTF-8 BOM", b"\xef\xbb\xbf" + json.dumps({"model": "auto", "messages": HELLO}).encode()),
    ("UTF-16", json.dumps({"model": "auto", "messages": HELLO}).encode("utf-16")),
    ("duplicate keys", b'{"model": "auto", "model": 5, "messages": []}'),
    ("trailing garbage", json.dumps({"model": "auto", "messages": HELLO}).encode() + b"}{"),
    ("single quotes", b"{'model': 'auto'}"),
    ("comments", b'{"model": "auto" /* hi */}'),
    ("NUL bytes", b"\x00" * 1000),
]  # fmt: skip


def dumps(body: object) -> bytes:
    """JSON text, with RAW: strings spliced in verbatim (numbers Python's json cannot write)."""
    raws: dict[str, str] = {}

    def mark(value):
        if isinstance(value, str) and value.startswith("RAW:"):
            raws[f"@@{len(raws)}@@"] = value[4:]
            return f"@@{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))
    for token, raw in raws.items():
        text = text.replace(f'"{token}"', raw)
    return text.encode()


class _Cases(list):
    """(surface, method, path, headers, body) cases, added one at a time."""

    def add(self, surface, body, path=CHAT, method="POST", headers=KEY):
        self.append((surface, method, path, headers, body if isinstance(body, bytes) else dumps(body)))


def base(path):
    return {"model": "auto", "messages": HELLO, "max_tokens": 4} if path == CHAT else {
        "model": "auto", "prompt": "hello", "max_tokens": 4}  # fmt: skip


def hostile_cases(rng: random.Random, per_field: int, huge: int, body_limit: int) -> list[tuple]:
    """(surface, method, path, headers, body) cases: `per_field` hostile values drawn for each
    field, `huge` strings of a quarter of the body limit or more, and all the other kinds."""
    cases = _Cases()
    _field_cases(cases.add, rng, per_field)
    _message_cases(cases.add, rng)
    _stop_and_unknown_cases(cases.add, rng)
    _huge_cases(cases.add, rng, huge, body_limit)
    _header_cases(cases.add, rng)
    _path_cases(cases.add)
    return list(cases)


def _field_cases(add, rng: random.Random, per_field: int) -> None:
    # Every field, every hostile value, on one endpoint or the other, streamed or not.
    for field in [*VALID, "messages", "prompt"]:
        for value in rng.sample(HOSTILE, per_field):
            path = COMPLETIONS if field == "prompt" else rng.choice([CHAT, COMPLETIONS])
            body = {**base(path), field: value}
            if rng.random() < 0.3:
                body["stream"] = True
            add("field types" if not isinstance(value, (int, float)) else "numbers", body, path)


def _message_cases(add, rng: random.Random) -> None:
    # Messages and their parts.
    roles = ["user", "system", "developer", "assistant", "tool", "wizard", "", None, 1, ["user"]]
    contents = ["hi", "", None, 5, [], [{"type": "text", "text": "hi"}], [{"type": "image_url"}], [{"text": 1}],
                [{"type": "text", "text": "\ud800"}], {"text": "hi"}, "\ud800", nested(100, "x")]  # fmt: skip
    for role in roles:
        for content in contents:
            message = {"role": role, "content": content, **rng.choice([{}, {"name": 3}, {"tool_calls": [1]}])}
            add("messages", {"model": "auto", "messages": [message], "max_tokens": 4, "stream": rng.random() < 0.3})
    for messages in [[], None, "hello", [None], [[]], [{}], HELLO * 2000, [{"role": "assistant", "content": "hi"}]]:
        add("messages", {"model": "auto", "messages": messages, "max_tokens": 4})


def _stop_and_unknown_cases(add, rng: random.Random) -> None:
    # Absurd stop lists.
    for stop in [[], [""], ["a"] * 5, ["a"] * 1000, [1, 2], [["a"]], "x" * 100_000, ["\ud800"], [None], {"a": "b"},
                 ["e", "l", "o", "h"], " ", "\n" * 4]:  # fmt: skip
        for path in (CHAT, COMPLETIONS):
            add("stop lists", {**base(path), "stop": stop, "stream": rng.random() < 0.5}, path)
    # Unknown and vLLM-only fields.
    for field in ["logits_processors", "lora_request", "guided_json", "guided_regex", "prompt_logprobs", "extra_body",
                  "__proto__", "", "model ", "a" * 1000, "min_tokens", "repetition_penalty", "priority"]:  # fmt: skip
        add("unknown fields", {**base(CHAT), field: rng.choice(HOSTILE)})


def _huge_cases(add, rng: random.Random, huge: int, body_limit: int) -> None:
    # Huge strings within the body limit.
    for i in range(huge):
        size = rng.randrange(body_limit // 4, body_limit - 4096)
        text = rng.choice(["word ", "x", "é", "🙂", "\n", "<|im_start|>"]) * (size // 4)
        path = rng.choice([CHAT, COMPLETIONS])
        body = {**base(path), "messages": [{"role": "user", "content": text}]} if path == CHAT else {
            **base(path), "prompt": text}  # fmt: skip
        add("huge strings", body | {"stream": i % 2 == 0}, path)
    add("huge strings", {**base(CHAT), "messages": [{"role": "user", "content": "x" * (body_limit + 10)}]})


def _header_cases(add, rng: random.Random) -> None:
    # Malformed JSON and text.
    for _, raw in STRUCTURAL:
        add("malformed JSON", raw, rng.choice([CHAT, COMPLETIONS]))
    # Content types and headers.
    valid = dumps(base(CHAT))
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
                         "application/json; charset=utf-16", b"application/json; charset=\xff", "*/*"]:  # fmt: skip
        add("headers", valid, headers={**KEY, "Content-Type": content_type})
    for auth in ["", "Bearer", "Bearer \tx", "Basic " + API_KEY, "bearer " + API_KEY, "Bearer " + API_KEY * 100,
                 b"Bearer \xff\xfe", API_KEY]:  # fmt: skip
        add("headers", valid, headers={"Authorization": auth, "Content-Type": "application/json"})
    lying = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n"
    add("headers", (lying + "Content-Length: 99999999999\r\n\r\n").encode() + valid, method="RAW")
    add("headers", valid, headers={**KEY, "Content-Encoding": "gzip"})


def _path_cases(add) -> None:
    valid = dumps(base(CHAT))
    # Paths and methods.
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]:
        for path in [CHAT, COMPLETIONS, "/v1/models"]:
            add("paths and methods", valid, path, method)
    for path in ["/", "/v1", "/v1/", "/v1/chat/completions/", "/v1/models/", "/v1/embeddings", "/v1/chat",
                 "/v1/chat/completions/x", "/V1/CHAT/COMPLETIONS", "/v1/completions%00", "/" + "a" * 8000,
                 "/v1/models?x=" + "y" * 2000, "/health/", "/metrics/x", "/%ff", "/v1/chat%2Fcompletions"]:  # fmt: skip
        add("paths and methods", valid, path)
    add("paths and methods", valid, "/health")  # POST on a GET route


def check_answer(reply: httpx.Response, method: str) -> None:
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:300]}"
    assert 200 <= reply.status_code < 300 or 400 <= reply.status_code < 500, reply.status_code
    if reply.status_code >= 400 and method != "HEAD":
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], error
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in reply.text and "upstream_error" not in reply.text, reply.text[-500:]


def exchange(server, request: bytes) -> httpx.Response:
    """A request written byte for byte on a socket (httpx would refuse it), read to the close."""
    host, port = server.root.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, content = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [line.split(": ", 1) for line in lines[1:]]
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=content)


def fuzz(server, cases) -> Counter:
    """Sends every case; returns the count of cases by surface. Fails on the first bad answer."""
    counts: Counter = Counter()
    with httpx.Client(base_url=server.root, timeout=60) as client, httpx.Client(timeout=10) as health:
        for surface, method, path, headers, body in cases:
            if method == "RAW":
                reply = exchange(server, body)
            else:
                reply = client.request(method, path, headers=headers, content=body)
            check_answer(reply, method)
            started = time.monotonic()
            assert health.get(f"{server.root}/health").status_code == 200
            assert time.monotonic() - started < 1.0, f"/health slow after {surface} {path}"
            counts[surface] += 1
    assert server.process.poll() is None
    assert "Traceback" not in server.log.read_text()
    return counts


def report(name: str, counts: Counter, cases) -> None:
    streamed = sum(b'"stream": true' in body for *_, body in cases)
    surfaces = ", ".join(f"{s} {n}" for s, n in counts.items())
    print(f"fuzz {name}: {sum(counts.values())} cases ({surfaces}; {streamed} of them streamed)")


@pytest.fixture(scope="module")
def fuzz_proxy(tmp_path_factory, router_dir, fake_upstream):
    args = ("--adapter", str(router_dir), "--upstream", fake_upstream.url, "--api-key", API_KEY, "--max-body-mb", "1")
    server = launch(tmp_path_factory.mktemp("fuzz-proxy"), *args)
    yield server
    server.stop()


def test_fuzz_the_proxy(fuzz_proxy, fake_upstream):
    cases = hostile_cases(random.Random(1401), per_field=8, huge=4, body_limit=1024 * 1024)
    counts = fuzz(fuzz_proxy, cases)
    report("proxy", counts, cases)
    assert sum(counts.values()) >= 400
    assert len(fake_upstream.bodies) >= 50  # the valid ones reached the upstream
    known = {"model", "messages", "prompt", *VALID}
    assert all(set(body) <= known for body in fake_upstream.bodies)  # no unknown field passed the proxy


def test_fuzz_serve(adapter_export, tmp_path_factory):
    """Every valid case generates (at most 4 tokens: --max-tokens-cap keeps the run short)."""
    args = ("--onnx", str(adapter_export), "--api-key", API_KEY, "--max-body-mb", "1", "--max-tokens-cap", "4")
    server = launch(tmp_path_factory.mktemp("fuzz-serve"), *args)
    try:
        cases = hostile_cases(random.Random(1400), per_field=8, huge=4, body_limit=1024 * 1024)
        counts = fuzz(server, cases)
        report("serve", counts, cases)
        assert sum(counts.values()) >= 400
        served = [line for line in server.metrics().splitlines() if line.startswith("hydra_edge_served_requests_total")]
        assert sum(float(line.split()[-1]) for line in served) >= 50  # many cases were valid and generated
    finally:
        server.stop()
