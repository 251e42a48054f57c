"""The UI's API, driven with gradio_client against a launched app (see conftest.py): uploads and
validation, training to an adapter, chat with routing, refusals (paths, sizes, a second start),
stop with a checkpoint and resume, export."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from uihelpers import QUICK, UPLOAD_LIMIT_MB, finetune_processes, wait_for_step, wait_until_done

from hydra_edge.models.tiny import DEMO_TRAIN

ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "clusters.json",
    "clusters.safetensors",
    "cluster_gates.safetensors",
    "metrics.jsonl",
    "run_config.json",
)


def test_upload_then_validate_the_demo_data(client, ui_server):
    report = client.predict(handle_file(str(DEMO_TRAIN)), api_name="/upload_data")
    assert report["file"].startswith("data/train") and report["file"].endswith(".jsonl")
    assert (report["format"], report["rows"], report["invalid"]) == ("messages", 396, 0)
    assert (ui_server.workspace / report["file"]).read_bytes() == DEMO_TRAIN.read_bytes()
    again = client.predict(data=report["file"], format="auto", api_name="/validate_data")
    assert {k: again[k] for k in ("file", "format", "rows", "invalid")} == {
        k: report[k] for k in again if k != "problems"
    }


def test_validation_lists_bad_rows_and_start_refuses_them(client, ui_server):
    bad = ui_server.workspace / "data" / "bad.jsonl"
    good_row = DEMO_TRAIN.read_text().splitlines()[0]
    bad.write_text("\n".join([good_row, "{not json", good_row, '{"messages": []}']) + "\n")
    report = client.predict(data="data/bad.jsonl", api_name="/validate_data")
    assert (report["rows"], report["invalid"]) == (2, 2)
    assert [p["location"] for p in report["problems"]] == ["data/bad.jsonl:2", "data/bad.jsonl:4"]
    with pytest.raises(AppError, match="2 invalid rows"):
        client.predict(data="data/bad.jsonl", run_name="bad-data", max_steps=5, **QUICK, api_name="/start_training")
    assert not (ui_server.workspace / "runs" / "bad-data").exists()


def _outside_paths(ui_server) -> list[str]:
    secret = ui_server.workspace.parent / "secret.jsonl"
    secret.write_text(DEMO_TRAIN.read_text().splitlines()[0] + "\n")
    return ["../secret.jsonl", "data/../../secret.jsonl", str(secret), "/etc/passwd"]


@pytest.mark.parametrize(
    "endpoint, argument",
    [
        ("/validate_data", "data"),
        ("/clusters", "data"),
        ("/start_training", "data"),
        ("/resume_training", "run"),
        ("/export", "adapter"),
        ("/export_result", "export"),
    ],
)
def test_paths_outside_the_workspace_are_refused(client, ui_server, endpoint, argument):
    for path in _outside_paths(ui_server):
        with pytest.raises(AppError, match=r"'\.\.' is not allowed|outside the workspace"):
            client.predict(**{argument: path}, api_name=endpoint)


def test_chat_refuses_a_model_outside_the_workspace(client, ui_server):
    for path in _outside_paths(ui_server):
        with pytest.raises(AppError, match=r"'\.\.' is not allowed|outside the workspace"):
            client.predict(message="hi", history=[], base_history=[], source=path, system_prompt="", api_name="/chat")


def test_oversized_upload_is_refused(client, ui_server, tmp_path):
    big = tmp_path / "big.jsonl"
    row = DEMO_TRAIN.read_text().splitlines()[0] + "\n"
    big.write_text(row * (int(UPLOAD_LIMIT_MB * 1.5 * 2**20) // len(row)))
    before = sorted(p.name for p in (ui_server.workspace / "data").iterdir())
    with open(big, "rb") as handle:  # the server refuses it, whatever the client does
        response = httpx.post(f"{ui_server.url}gradio_api/upload", files={"files": ("big.jsonl", handle)})
    assert response.status_code == 413
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(str(big)), api_name="/upload_data")
    assert sorted(p.name for p in (ui_server.workspace / "data").iterdir()) == before


def test_a_server_file_that_was_not_uploaded_is_refused(ui_server):
    """A crafted request naming a server path instead of an uploaded file gets nothing copied."""
    secret = ui_server.workspace.parent / "not-uploaded.jsonl"
    secret.write_text('{"text": "secret"}\n')
    call = f"{ui_server.url}gradio_api/call/upload_data"
    event = httpx.post(call, json={"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]}).json()
    answer = httpx.get(f"{call}/{event['event_id']}", timeout=60).text
    assert "event: error" in answer and "not uploaded" in answer
    assert not any(p.name.startswith("not-uploaded") for p in (ui_server.workspace / "data").iterdir())


def test_a_20_step_training_completes_and_its_adapter_appears(client, ui_server, trained_run):
    assert trained_run == "runs/api-20"
    run = ui_server.workspace / trained_run
    for name in ADAPTER_FILES:
        assert (run / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_chat_answers_and_shows_the_routed_cluster(client, ui_server, trained_run):
    history, base_history, routing, result, cleared = client.predict(
        message="Tell me if this review is positive or negative: This meal is fantastic.",
        history=[],
        base_history=[],
        source=trained_run,
        system_prompt="",
        temperature=0.0,
        max_tokens=16,
        compare_base=True,
        api_name="/chat",
    )
    heads = json.loads((ui_server.workspace / trained_run / "adapter_config.json").read_text())["heads"]
    assert result["backend"] == "pytorch" and isinstance(result["cluster"], int) and 0 <= result["cluster"] < heads
    assert isinstance(result["answer"], str) and result["answer"].strip()
    assert len(result["gates"]) == heads and abs(sum(result["gates"]) - 1) < 1e-2
    assert isinstance(result["base_answer"], str)
    assert f"cluster {result['cluster']}" in routing
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert history[1]["metadata"]["title"] == f"router → cluster {result['cluster']}"
    assert [m["role"] for m in base_history] == ["user", "assistant"]
    assert cleared == ""
    # the next turn carries the history (the routing note is display-only)
    history2, *_, result2, _ = client.predict(
        message="And this one: The phone was dreadful.",
        history=history,
        base_history=[],
        source=trained_run,
        system_prompt="You judge reviews.",
        max_tokens=8,
        api_name="/chat",
    )
    assert len(history2) == 6 and isinstance(result2["cluster"], int)


def test_two_concurrent_starts_spawn_one_process_then_stop_and_resume(client, ui_server):
    jobs = ui_server.ctx.jobs
    spawned_before = jobs.spawned
    barrier, outcomes = threading.Barrier(2), []

    def start() -> None:
        own = ui_server.client()
        barrier.wait()
        try:
            outcomes.append(
                own.predict(
                    data="data/demo/train.jsonl", max_steps=10_000, run_name="race", **QUICK, api_name="/start_training"
                )["state"]
            )
        except AppError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[1] == "running", outcomes
    assert "already running" in sorted(outcomes)[0], outcomes
    assert jobs.spawned == spawned_before + 1
    assert len(finetune_processes("runs/race")) == 1

    status = wait_for_step(client, 3)
    assert status["state"] == "running", status["message"]
    status = client.predict(api_name="/stop_training")
    assert status["state"] == "stopped", status["message"]
    checkpoint = ui_server.workspace / status["checkpoint"]
    assert (checkpoint / "trainer_state.json").is_file()
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped_at < 10_000 and status["step"] == stopped_at
    assert finetune_processes("runs/race") == []
    with pytest.raises(AppError, match="already used"):
        client.predict(
            data="data/demo/train.jsonl", max_steps=10_000, run_name="race", **QUICK, api_name="/start_training"
        )

    with pytest.raises(AppError, match="checkpoint is at step"):
        client.predict(run="race", max_steps=stopped_at, api_name="/resume_training")
    # to a new, shorter total: the run finishes quickly however fast this machine is
    status = client.predict(run="race", max_steps=stopped_at + 8, api_name="/resume_training")
    assert status["state"] == "running"
    status = wait_until_done(client)
    assert status["state"] == "finished", status["message"]
    steps = [
        json.loads(line)["step"] for line in (ui_server.workspace / "runs/race/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, stopped_at + 9)), "the resumed run continues the step numbers, each step once"
    assert jobs.spawned == spawned_before + 2


def test_stop_with_nothing_running_is_a_clear_message(client):
    with pytest.raises(AppError, match="nothing to stop"):
        client.predict(api_name="/stop_training")


def test_export_runs_validates_and_lists_its_files(client, ui_server, exported):
    assert exported["export"] == "exports/api-export" and exported["mode"] == "adapters"
    assert exported["checks"] and all(c["max_abs_logit_diff"] <= 1e-3 for c in exported["checks"])
    files = {f["file"] for f in exported["files"]}
    assert "export_manifest.json" in files and any(f.startswith("adapters/cluster_") for f in files)
    reopened, *_ = client.predict(export="exports/api-export", api_name="/export_result")
    assert reopened == exported
    with pytest.raises(AppError, match="already exists"):
        client.predict(adapter="runs/api-20", mode="adapters", precision="fp32", name="api-export", api_name="/export")


def test_chat_with_an_onnx_export(client, exported):
    *_, result, _ = client.predict(
        message="What is the capital of Japan?",
        history=[],
        base_history=[],
        source=exported["export"],
        system_prompt="",
        max_tokens=8,
        api_name="/chat",
    )
    assert result["backend"] == "onnx" and isinstance(result["cluster"], int) and isinstance(result["answer"], str)
    with pytest.raises(AppError, match="needs a finished run"):
        client.predict(
            message="hi",
            history=[],
            base_history=[],
            source=exported["export"],
            system_prompt="",
            compare_base=True,
            api_name="/chat",
        )


def test_clusters_of_the_demo_data(client):
    found, summary, table, image = client.predict(data="data/demo/train.jsonl", api_name="/clusters")
    assert found["rows"] == 396 and found["k"] == len(found["sizes"]) == len(found["top_terms"]) >= 2
    assert sum(found["sizes"]) == 396 and f"k = {found['k']}" in summary
    assert len(table["data"]) == found["k"] and image


def test_with_auth_nothing_answers_before_sign_in(tmp_path):
    from cli_helpers import free_port
    from gradio_client import Client

    from hydra_edge.ui.app import create_ui, launch

    demo = create_ui(tmp_path / "ws")
    _, url, _ = launch(demo, port=free_port(), auth=("admin", "s3cret"), prevent_thread_lock=True, quiet=True)
    try:
        for route in (
            "config",
            "gradio_api/info",
            f"gradio_api/file={tmp_path / 'ws' / 'data' / 'demo' / 'train.jsonl'}",
        ):
            assert httpx.get(url + route).status_code in (401, 403), route
        with pytest.raises(ValueError, match="Could not (load|fetch)"):  # gradio_client's answer to a 401
            Client(url, verbose=False).predict(api_name="/training_status")
        signed_in = Client(url, auth=("admin", "s3cret"), verbose=False)
        assert signed_in.predict(api_name="/training_status")["state"] == "idle"
    finally:
        demo.close()
