"""The server's parts on their own (no model): stop strings, request checks, admission, the
command's refusals, and the proxy's answer when its upstream is down."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, free_port, run_in_process

from hydra_edge.server.errors import ApiError
from hydra_edge.server.requests import ChatRequest, CompletionRequest, parse
from hydra_edge.server.stops import StopScanner


def scan(stops, pieces):
    scanner, out = StopScanner(stops), []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        (["END"], ["Hello ", "world"], ("Hello world", False)),
        (["END"], ["Hello E", "N", "D and more"], ("Hello ", True)),  # split across three pieces
        (["END"], ["Hello E", "NOUGH"], ("Hello ENOUGH", False)),  # a prefix that did not become one
        (["\n\n", "###"], ["a\n", "b##", "#c"], ("a\nb", True)),  # the earliest of several
        (["ab", "b"], ["xab"], ("x", True)),
        ([], ["no", " stops"], ("no stops", False)),
    ],
)
def test_stop_strings_cut_the_answer_and_are_never_sent(stops, pieces, expected):
    assert scan(stops, pieces) == expected


def test_held_back_text_is_only_a_possible_stop_prefix():
    scanner = StopScanner(["STOP"])
    assert scanner.feed("abcST") == ("abc", False)  # "ST" may begin STOP
    assert scanner.feed("x") == ("STx", False)


def test_parse_names_the_field_and_accepts_what_clients_send():
    request = parse(
        ChatRequest,
        {
            "model": "auto",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": "hi", "name": "ann"}],
            "user": "someone", "metadata": {"a": 1}, "n": 1, "presence_penalty": 0, "stop": "\n",
            "max_completion_tokens": 7,
        },
    )  # fmt: skip
    assert request.turns() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert request.wanted_tokens() == 7 and request.stop_strings() == ["\n"]
    assert parse(CompletionRequest, {"model": "auto", "prompt": ["one"]}).prompt == "one"
    with pytest.raises(ApiError) as caught:
        parse(ChatRequest, {"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
    assert caught.value.status == 400 and caught.value.param == "temperature"


def test_admission_counts_running_and_waiting_and_refuses_beyond_the_queue():
    from hydra_edge.server.admission import Admission

    async def scenario():
        admission = Admission(slots=1, queue=1)
        first, second = admission.admit(), admission.admit()
        assert admission.admit() is None  # one running place and one waiting place are taken
        await first.take_slot()
        waiter = asyncio.ensure_future(second.take_slot())
        await asyncio.sleep(0)
        assert (admission.running, admission.waiting) == (1, 1) and not waiter.done()
        first.worker_owns_slot = True
        first.close()  # the response ended, but its worker still holds the slot
        assert not waiter.done() and admission.running == 1
        first.free_slot()  # the worker ended
        await waiter
        assert (admission.running, admission.waiting) == (1, 0)
        second.close()
        second.close()  # closing twice changes nothing
        assert (admission.admitted, admission.running, admission.waiting) == (0, 0, 0)
        third = admission.admit()
        cancelled = asyncio.ensure_future(third.take_slot())  # no slot is free: it waits
        blocker = admission.admit()
        await blocker.take_slot()
        await asyncio.sleep(0)
        assert admission.waiting == 1
        cancelled.cancel()  # its client left while it waited
        await asyncio.sleep(0)
        third.close()
        assert (admission.waiting, admission.running, admission.admitted) == (0, 1, 1)
        blocker.close()
        assert admission.admit() is not None

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--onnx", "x", "--host", "0.0.0.0"], ["--host 0.0.0.0", "--api-key"]),
        (["--onnx", "x", "--host", "192.168.1.5"], ["reachable from other machines"]),
        (["--onnx", "x", "--api-key", " "], ["--api-key: empty"]),
        (["--onnx", "x", "--adapter", "y"], ["one of --onnx DIR", "not several"]),
        ([], ["one of --onnx DIR, --gguf DIR"]),
        (["--onnx", "x", "--port", "70000"], ["--port 70000"]),
        (["--onnx", "x", "--max-concurrency", "0"], ["--max-concurrency 0"]),
        (["--onnx", "x", "--max-body-mb", "0"], ["--max-body-mb 0"]),
        (["--onnx", "x", "--upstream", "ftp://example"], ["--upstream ftp://example"]),
        (["--onnx", "/nonexistent-export", "--port", "0"], ["/nonexistent-export", "no such folder"]),
        (["--onnx", "/nonexistent-export", "--port", "0", "--upstream", "http://127.0.0.1:9"], ["no request router"]),
    ],
)
def test_serve_refuses_bad_options_in_one_line(args, needles):
    assert_one_line_error(run_in_process("serve", *args), *needles)


def test_a_taken_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_in_process("serve", "--onnx", "/nonexistent-export", "--port", str(port))
    assert_one_line_error(result, f"--port {port}", "cannot serve there")


def test_the_proxy_answers_502_when_its_upstream_is_down():
    from fastapi.testclient import TestClient

    from hydra_edge.clusters.router import RequestRouter
    from hydra_edge.server.app import ServeSettings, create_app
    from hydra_edge.server.proxy import UpstreamBackend

    dead = f"http://127.0.0.1:{free_port()}/v1"  # a port nothing listens on
    router = RequestRouter({}, np.zeros(0), np.zeros((0, 0)), np.zeros((2, 0)), (2, 4))
    app = create_app(lambda metrics: UpstreamBackend(dead, None, router, metrics), ServeSettings())
    with TestClient(app) as client:
        reply = client.post(
            "/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}]}
        )
        assert reply.status_code == 502
        assert reply.json()["error"]["type"] == "upstream_error" and dead in reply.json()["error"]["message"]
        assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"seed": 2**64}, "seed", "use 0 to 2147483647"),
        ({"seed": 2**31}, "seed", "use 0 to 2147483647"),  # ONNX Runtime GenAI's seed is 32-bit
        ({"seed": -1}, "seed", "use 0 to 2147483647"),  # -1 is GenAI's "random": not reproducible
        ({"n": True}, "n", "`n` is not supported"),  # a bool is not the integer 1
        ({"n": 1.0}, "n", "`n` is not supported"),
        ({"logprobs": 0}, "logprobs", "`logprobs` is not supported"),
        ({"echo": None, "presence_penalty": False}, "presence_penalty", "`presence_penalty` is not supported"),
    ],
)
def test_parse_is_strict_about_numbers_and_types(fields, param, words):
    with pytest.raises(ApiError) as caught:
        parse(ChatRequest, {"model": "auto", "messages": [{"role": "user", "content": "x"}], **fields})
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


def test_parse_accepts_the_edges_of_the_ranges():
    hello = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    assert parse(ChatRequest, {**hello, "seed": 2**31 - 1}).seed == 2**31 - 1
    assert parse(ChatRequest, {**hello, "seed": 0, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0}).seed == 0


@pytest.mark.parametrize(
    "raw, param, words",
    [
        (b"[" * 100_000, None, "the body nests too deep"),
        (b'{"a": ' * 50_000, None, "the body nests too deep"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content",
         "`messages.0.content` is not valid UTF-8 text"),
        ('{"model": "auto", "messages": [{"role": "user", "content": "a\ud800"}]}'.encode("utf-8", "surrogatepass"),
         "messages.0.content", "not valid UTF-8 text"),  # the surrogate as raw bytes, not an escape
        (b'{"model": "auto", "stop": ["\\udfff"]}', "stop.0", "`stop.0` is not valid UTF-8"),
        (b'{"model": "auto", "metadata": {"\\ud800": 1}}', "metadata.\\ud800", "not valid UTF-8"),
        (b'{"temperature": NaN}', None, "NaN is not a JSON number"),
        (b'{"seed": -Infinity}', None, "-Infinity is not a JSON number"),
        (b'{"seed": ' + b"9" * 5000 + b"}", None, "not valid JSON"),  # past Python's int-digits limit
        (b"\xff\xfe{}", None, "not valid JSON"),
    ],
)  # fmt: skip
def test_decode_json_refuses_what_would_crash_later_with_a_400(raw, param, words):
    from hydra_edge.server.requests import decode_json

    with pytest.raises(ApiError) as caught:
        decode_json(raw)
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


def test_request_preparation_runs_on_a_worker_thread_and_a_user_error_is_a_400():
    """A chat template that refuses a conversation (or runs out of its time budget) raises a
    UserError while the request is prepared: a 400 naming the field, raised off the event loop."""
    import threading

    from fastapi.testclient import TestClient

    from hydra_edge.errors import UserError
    from hydra_edge.server.app import ServeSettings, create_app

    class TemplateTimeout(UserError):
        pass

    threads = []

    class Refusing:
        def model_ids(self):
            return ["auto"]

        def prepare(self, kind, request):
            threads.append(threading.current_thread().name)
            raise TemplateTimeout("the chat template took longer than 5 s to render this conversation")

    app = create_app(lambda metrics: Refusing(), ServeSettings())
    with TestClient(app) as client:
        hello = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
        chat = client.post("/v1/chat/completions", json=hello)
        completion = client.post("/v1/completions", json={"model": "auto", "prompt": "x"})
        assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}  # slots freed
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert "longer than 5 s" in chat.json()["error"]["message"]
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"
    assert threads and all(name.startswith("hydra-prepare") for name in threads), threads
