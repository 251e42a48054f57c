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
