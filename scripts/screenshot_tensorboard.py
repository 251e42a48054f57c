"""Draws docs/screenshots/tensorboard.png: a short tiny run with held-out evals, logged to
TensorBoard, shown by TensorBoard itself in headless Chromium (Debian's; nothing downloaded).

    python scripts/screenshot_tensorboard.py [--out docs/screenshots/tensorboard.png]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots/tensorboard.png"))
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tb-shot-"))
    run = work / "run"
    train = [sys.executable, "-m", "hydra_edge", "finetune", "--out", str(run), "--max-steps", str(args.steps),
             "--eval-every", "10", "--eval-em-rows", "16", "--report-to", "tensorboard",
             "--run-name", "tiny-demo"]  # fmt: skip
    subprocess.run(train, check=True)
    port = free_port()
    board = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run / "runs"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/data/runs", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{url}/?pinnedCards=&tagFilter=loss%7Cexact_match%7Chead_0_share#timeseries")
            page.wait_for_selector("canvas, svg.line-chart, .line-chart", timeout=60_000)
            time.sleep(5)  # the charts draw after their data arrives
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=False)
            browser.close()
    finally:
        board.terminate()
        board.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
