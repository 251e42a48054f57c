"""Launching `hydra-edge serve` as a user would (a subprocess on a free port) and reading it back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-secret-key"


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT/v1
    log: Path  # the server's stderr (uvicorn's access log, our request lines)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def client(self, **kwargs):
        """The official openai client, with the key and no retries (a 429 must be seen, not retried)."""
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=kwargs.pop("api_key", API_KEY), max_retries=0, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.root}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text

    def metric(self, name: str, **labels) -> float:
        """The value of one sample in /metrics (0 when absent)."""
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
        found = re.search(r"^" + pattern + "$", self.metrics(), re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def launch(tmp_path: Path, *args: str) -> Server:
    """Starts `hydra-edge serve ARGS --port 0` and waits for its first line, which names the URL."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "hydra_edge", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=os.environ.copy(),
    )
    line = process.stdout.readline()  # blocks until the server prints its URL (or exits)
    found = re.search(r"(http://\S+/v1)", line)
    if not found:
        process.kill()
        raise AssertionError(f"serve did not start: {line!r}\n{log.read_text()[-3000:]}")
    server = Server(process, found.group(1), log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.root}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError(f"serve never answered /health\n{log.read_text()[-3000:]}")


def write_router(folder: Path) -> Path:
    """A two-cluster request router (clusters.json + clusters.safetensors) built by hand: what
    `serve --adapter FOLDER --upstream URL` loads, so a proxy starts in half a second, no model."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = {gram: i for i, gram in enumerate([" he", "hel", "ell", "llo", " wo", "wor", "orl", "rld"])}
    meta = {
        "k": 2,
        "sizes": [1, 1],
        "inertia_by_k": {"2": 0.0},
        "featurizer": {"analyzer": "char_wb", "ngram_range": [1, 4], "sublinear_tf": True, "lsa_dims": 2,
                       "l2_normalised": True},  # 1-4: as trained routers, so routing costs what it does there
        "top_terms": [[], []],
        "labels": [],
        "vocabulary": vocabulary,
    }  # fmt: skip
    (folder / "clusters.json").write_text(json.dumps(meta))
    projection = np.zeros((2, len(vocabulary)), dtype=np.float32)
    projection[0, :4], projection[1, 4:] = 1, 1  # "hello" leans to cluster 0, "world" to cluster 1
    idf, centroids = np.ones(len(vocabulary), np.float32), np.eye(2, dtype=np.float32)
    save_file({"idf": idf, "projection": projection, "centroids": centroids}, str(folder / "clusters.safetensors"))
    return folder


class FakeUpstream:
    """An OpenAI-compatible upstream on loopback (a thread of this process) that answers every
    chat or completion with "ok", streamed or whole, and records the bodies it received. A
    request whose text holds HANG gets no answer: the handler waits until its client hangs up
    (recorded in `hung_up`) or the test ends."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict] = []
        self.hung_up = threading.Event()
        self.released = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.bodies.append(body)
                if "HANG" in json.dumps(body):
                    upstream.hang(self.connection)
                    return
                chat = self.path.endswith("/chat/completions")
                choice = {"index": 0, "finish_reason": "stop"}
                choice.update({"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"})
                answer = {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                          "model": body.get("model"), "choices": [choice]}  # fmt: skip
                if body.get("stream"):
                    delta = {"index": 0, "delta": {"content": "ok"}, "finish_reason": None}
                    chunk = {**answer, "object": "chat.completion.chunk", "choices": [delta]}
                    content = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                    media = "text/event-stream"
                else:
                    content, media = json.dumps(answer).encode(), "application/json"
                self.send_response(200)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hang(self, connection) -> None:
        import select

        while not self.released.is_set():
            if select.select([connection], [], [], 0.05)[0] and not connection.recv(1, 0x2):  # MSG_PEEK: EOF
                self.hung_up.set()
                return

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
