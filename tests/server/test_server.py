"""`hydra-edge serve` against the official openai client: routing, pinning, streaming, stops,
usage, metrics. The server runs in a subprocess on the tiny export (see conftest.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from cli_helpers import run_cli
from serverhelpers import API_KEY

from hydra_edge.clusters.router import RequestRouter
from hydra_edge.data.records import prompt_ids, routing_text, text_prompt_ids
from hydra_edge.inference.protocol import Sampling
from hydra_edge.models.tiny import DEMO_EVAL


def demo_prompts_by_cluster(export) -> dict[int, str]:
    """One demo question per cluster the export's router sends demo questions to."""
    router = RequestRouter.from_dir(export / "router")
    found: dict[int, str] = {}
    for line in DEMO_EVAL.read_text().splitlines():
        question = json.loads(line)["messages"][0]["content"]
        turns = [{"role": "user", "content": question}]
        found.setdefault(int(router.route([routing_text(turns)])[0]), question)
    return found


@pytest.fixture(scope="module")
def engine(adapter_export):
    """The export's engine in this process: what the server's answers are checked against."""
    from hydra_edge.exporters.onnx_chat import OnnxChat

    return OnnxChat(adapter_export)


def ask(server, question: str, **options):
    options = {"model": "auto", "temperature": 0, "max_tokens": 32, **options}
    return server.client().chat.completions.create(messages=[{"role": "user", "content": question}], **options)


def test_models_lists_auto_every_cluster_and_the_base(api_server, adapter_export):
    clusters = json.loads((adapter_export / "export_manifest.json").read_text())["clusters"]
    ids = [m.id for m in api_server.client().models.list()]
    assert ids == ["auto", *[f"cluster_{c}" for c in clusters], "base"]


def test_auto_routing_gives_what_chat_onnx_gives(api_server, adapter_export):
    """Same cluster and same greedy text as `hydra-edge chat --onnx`, for prompts in two clusters."""
    prompts = demo_prompts_by_cluster(adapter_export)
    assert len(prompts) >= 2
    for cluster, question in list(prompts.items())[:2]:
        chat = run_cli("chat", "--onnx", str(adapter_export), "--prompt", question, "--max-new-tokens", "32")
        assert chat.returncode == 0, chat.stderr[-2000:]
        assert f"[cluster {cluster} |" in chat.stderr
        raw = api_server.client().chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=32
        )
        reply = raw.parse()
        assert raw.headers["x-hydra-cluster"] == str(cluster)
        assert reply.model_extra["hydra_cluster"] == cluster
        assert reply.system_fingerprint == f"hydra-edge:cluster_{cluster}"
        assert reply.choices[0].message.content.strip() == chat.stdout.strip()


def test_streaming_gives_the_whole_answer_in_pieces_with_usage(api_server, adapter_export):
    question = next(iter(demo_prompts_by_cluster(adapter_export).values()))
    whole = ask(api_server, question, model="base", max_tokens=24)
    chunks = list(
        api_server.client().chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1
    assert all(c.model_extra["hydra_cluster"] is None for c in chunks)  # the base serves, no cluster


def test_pinned_cluster_and_base_are_served_as_asked(api_server, adapter_export, engine):
    prompts = demo_prompts_by_cluster(adapter_export)
    routed, question = next(iter(prompts.items()))
    other = next(c for c in engine.forceable_clusters() if c != routed)
    turns = [{"role": "user", "content": question}]
    ids = prompt_ids(engine.tokenizer(other), turns)
    for model, serve_as, cluster in [(f"cluster_{other}", "cluster", other), ("base", "base", None)]:
        raw = api_server.client().chat.completions.with_raw_response.create(
            model=model, messages=turns, temperature=0, max_tokens=16
        )
        reply = raw.parse()
        assert reply.model == model and reply.model_extra["hydra_cluster"] == cluster
        assert raw.headers["x-hydra-cluster"] == ("base" if cluster is None else str(cluster))
        expected = "".join(engine.stream(ids, other, serve_as, Sampling(16)))
        assert reply.choices[0].message.content == expected
    base = ask(api_server, question, model="base", max_tokens=16).choices[0].message.content
    pinned = ask(api_server, question, model=f"cluster_{routed}", max_tokens=16).choices[0].message.content
    assert base != pinned  # the adapter changes the answer


def test_plain_completions_stream_and_whole(api_server, engine):
    client = api_server.client()
    whole = client.completions.create(model="base", prompt="The capital of", max_tokens=12, temperature=0)
    assert whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(text_prompt_ids(engine.tokenizer(0), "The capital of"))
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model="base", prompt="The capital of", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_sequences_end_the_answer_before_them(api_server):
    question = "Tell me anything."
    full = ask(api_server, question, model="base", max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    expected = full[: full.index(stop)]
    for stream in (False, True):
        options = {"model": "base", "max_tokens": 24, "stop": [stop, "never-seen-stop"], "stream": stream}
        if stream:
            chunks = [c for c in ask(api_server, question, **options) if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            reply = ask(api_server, question, **options)
            text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
        assert text == expected and finish == ["stop"]
    short = ask(api_server, question, model="base", max_tokens=5)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"


def test_a_seed_makes_sampling_repeatable(api_server):
    def sample(seed):
        return ask(api_server, "Say something.", model="base", temperature=1.0, seed=seed, max_tokens=16)

    first, again = sample(7), sample(7)
    assert first.choices[0].message.content == again.choices[0].message.content
    greedy = ask(api_server, "Say something.", model="base", max_tokens=16).choices[0].message.content
    assert {sample(s).choices[0].message.content for s in (1, 2, 3)} != {greedy}  # it does sample


def test_metrics_count_requests_tokens_clusters_and_latency(api_server, adapter_export):
    cluster, question = next(iter(demo_prompts_by_cluster(adapter_export).items()))
    before = {
        "requests": api_server.metric(
            "hydra_edge_requests_total", endpoint="/v1/chat/completions", model="auto", status="200"
        ),
        "served": api_server.metric("hydra_edge_served_requests_total", served_by=f"cluster_{cluster}"),
        "tokens": api_server.metric("hydra_edge_completion_tokens_total"),
        "latency": api_server.metric("hydra_edge_request_seconds_count"),
        "first": api_server.metric("hydra_edge_time_to_first_token_seconds_count"),
    }
    reply = ask(api_server, question)
    after = api_server.metrics()
    assert (
        api_server.metric("hydra_edge_requests_total", endpoint="/v1/chat/completions", model="auto", status="200")
        == before["requests"] + 1
    )
    assert api_server.metric("hydra_edge_served_requests_total", served_by=f"cluster_{cluster}") == before["served"] + 1
    assert api_server.metric("hydra_edge_completion_tokens_total") == before["tokens"] + reply.usage.completion_tokens
    assert api_server.metric("hydra_edge_request_seconds_count") == before["latency"] + 1
    assert api_server.metric("hydra_edge_time_to_first_token_seconds_count") == before["first"] + 1
    assert "hydra_edge_queue_depth 0.0" in after and "hydra_edge_requests_running 0.0" in after
    assert httpx.get(f"{api_server.root}/metrics").status_code == 401  # behind the key
    assert httpx.get(f"{api_server.root}/health").json()["status"] == "ok"  # never behind it


def test_the_request_lines_name_model_cluster_and_tokens(api_server):
    ask(api_server, "What is the capital of Peru?", model="base", max_tokens=3)
    assert "base -> base: 13 prompt + 3 answer tokens (length)" in api_server.log.read_text()
    assert API_KEY not in api_server.log.read_text()


def test_the_pytorch_backend_routes_like_chat_adapter(torch_server, trained_adapter, adapter_export):
    cluster, question = next(iter(demo_prompts_by_cluster(adapter_export).items()))
    chat = run_cli("chat", "--adapter", str(trained_adapter), "--prompt", question, "--max-new-tokens", "16")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert f"[cluster {cluster} |" in chat.stderr
    reply = ask(torch_server, question, max_tokens=16)
    assert reply.model_extra["hydra_cluster"] == cluster
    assert reply.choices[0].message.content.strip() == chat.stdout.strip()
    assert [m.id for m in torch_server.client().models.list()][-1] == "base"
    base = ask(torch_server, question, model="base", max_tokens=16)
    assert (
        base.model_extra["hydra_cluster"] is None
        and base.choices[0].message.content != reply.choices[0].message.content
    )
