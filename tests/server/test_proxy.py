"""`serve --upstream`: a routing proxy in front of another OpenAI-compatible server. Here the
upstream is a second `hydra-edge serve` (real HTTP both ways), which serves cluster_<c> by name
as vLLM does with --lora-modules; the test reads what it received from its own metrics."""

from __future__ import annotations

from test_server import demo_prompts_by_cluster


def chat_requests_for(server, model: str) -> float:
    return server.metric("hydra_edge_requests_total", endpoint="/v1/chat/completions", model=model, status="200")


def test_the_upstream_receives_the_routed_clusters_adapter_name(proxy_server, api_server, adapter_export):
    for cluster, question in list(demo_prompts_by_cluster(adapter_export).items())[:2]:
        messages = [{"role": "user", "content": question}]
        before = chat_requests_for(api_server, f"cluster_{cluster}")
        raw = proxy_server.client().chat.completions.with_raw_response.create(
            model="auto", messages=messages, temperature=0, max_tokens=16
        )
        reply = raw.parse()
        assert chat_requests_for(api_server, f"cluster_{cluster}") == before + 1
        assert raw.headers["x-hydra-cluster"] == str(cluster)
        assert reply.model == f"cluster_{cluster}"  # the upstream answers under the name it was asked for
        assert reply.model_extra["hydra_cluster"] == cluster
        direct = api_server.client().chat.completions.create(
            model=f"cluster_{cluster}", messages=messages, temperature=0, max_tokens=16
        )
        assert reply.choices[0].message.content == direct.choices[0].message.content


def test_streams_pass_through_the_proxy(proxy_server, api_server, adapter_export):
    cluster, question = next(iter(demo_prompts_by_cluster(adapter_export).items()))
    messages = [{"role": "user", "content": question}]
    before = chat_requests_for(api_server, "base")
    chunks = list(
        proxy_server.client().chat.completions.create(
            model="base", messages=messages, temperature=0, max_tokens=12, stream=True
        )
    )
    assert chat_requests_for(api_server, "base") == before + 1
    direct = api_server.client().chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=12)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == direct.choices[0].message.content
    completion = proxy_server.client().completions.create(model="auto", prompt=question, max_tokens=4, temperature=0)
    assert completion.model.startswith("cluster_")


def test_the_proxy_checks_requests_itself(proxy_server, api_server):
    import openai
    import pytest

    before = api_server.metric("hydra_edge_requests_total", endpoint="/v1/chat/completions", model="unknown",
                               status="404")  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        proxy_server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        proxy_server.client().chat.completions.create(model="auto", messages=[])
    with pytest.raises(openai.AuthenticationError):
        proxy_server.client(api_key="wrong").models.list()
    assert api_server.metric("hydra_edge_requests_total", endpoint="/v1/chat/completions", model="unknown",
                             status="404") == before  # fmt: skip
    assert [m.id for m in proxy_server.client().models.list()] == [m.id for m in api_server.client().models.list()]
