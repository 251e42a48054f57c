"""The UI in a real browser: Playwright drives Debian's Chromium (headless; no browser is ever
downloaded). Starts a training, watches the loss plot gain points, reloads the page and finds
the run again, stops it, finds clusters, chats, opens an export, and saves a screenshot of each
tab to docs/screenshots/ (the README shows them).

Without Chromium the test is skipped, except under CI (the CI variable set), where it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from uihelpers import ROOT

pytestmark = pytest.mark.slow  # trains, exports or drives a browser

CHROMIUM = os.environ.get("HYDRA_EDGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(os.environ.get("HYDRA_EDGE_SCREENSHOTS", ROOT / "docs" / "screenshots"))
TIMEOUT_MS = 240_000  # generous: CI machines have 2 cores


def _browser_or_skip():
    missing = None
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; the browser test must run in CI")
        pytest.skip(missing)
    return sync_playwright


def _plot_points(page, more_than: int = 0) -> int:
    """Waits until the loss plot draws more than `more_than` points (Vega draws one hover symbol
    per data point) and returns how many, read in one go in the page: the chart is redrawn from
    scratch when a new series (held-out loss) joins, and a count taken mid-redraw is 0."""
    count = "document.querySelectorAll('#loss-plot .hover_marks path').length"
    return page.wait_for_function(f"() => {{ const n = {count}; return n > {more_than} ? n : false; }}").json_value()


def _set_number(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input")
    field.fill(value)
    field.press("Tab")


def test_train_watch_reload_stop_then_chat_in_a_browser(ui_server, trained_run, exported):
    sync_playwright = _browser_or_skip()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            outside_requests = []
            page.on(
                "request", lambda r: outside_requests.append(r.url) if not r.url.startswith(ui_server.url) else None
            )
            page.goto(ui_server.url)
            _train_watch_reload_and_stop(page, ui_server, "browser-run")
            _find_clusters(page)
            _chat_beside_the_base_model(page, trained_run)
            _open_an_export(page, exported)
            assert outside_requests == [], "the UI must work offline"
        finally:
            browser.close()
            if ui_server.ctx.jobs.active() is not None:  # a failure above: leave the slot free for other tests
                ui_server.ctx.jobs.shutdown(timeout=60)


def _train_watch_reload_and_stop(page, ui_server, run: str) -> None:
    """Train: a run long enough to stop halfway, small enough to be quick per step; the loss plot
    gains points, a reload finds the running job again, and a stop leaves a checkpoint."""
    page.locator("#run-name").get_by_role("textbox").fill(run)
    for elem_id, value in (("max-steps", "400"), ("seq-len", "64"), ("batch-size", "4"), ("eval-every", "5")):
        _set_number(page, elem_id, value)
    page.wait_for_function("document.querySelector('#train-command').innerText.includes('max_steps: 400')")
    page.locator("#start-training").click()
    first = _plot_points(page, more_than=1)
    assert _plot_points(page, more_than=first) > first >= 2
    _plot_points(page, more_than=11)
    # --eval-every 5: held-out loss joins the plot and the status line
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('held-out loss')")
    assert f"Training {run}: step" in page.locator("#train-status").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "train.png"), full_page=True)

    # A reload finds the running job again: status, progress and the curve so far.
    seen = _plot_points(page)
    page.reload()
    assert _plot_points(page, more_than=seen - 1) >= seen
    assert run in page.locator("#train-status").inner_text()

    page.locator("#stop-training").click()
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('stopped at step')")
    status = page.locator("#train-status").inner_text()
    assert "checkpoint saved" in status and "Resume continues it" in status
    checkpoints = list((ui_server.workspace / "runs" / run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()


def _find_clusters(page) -> None:
    """Data: the clusters of the demo data, with their picture."""
    page.get_by_role("tab", name="Data").click()
    page.locator("#find-clusters").click()
    page.wait_for_function("document.querySelector('#clusters-summary').innerText.includes('clusters')")
    assert "k = " in page.locator("#clusters-summary").inner_text()
    page.wait_for_function(
        "(() => { const img = document.querySelector('#clusters-plot img'); "
        "return img && img.complete && img.naturalWidth > 0; })()"
    )
    page.wait_for_timeout(1000)  # the fade-in of the new picture
    page.screenshot(path=str(SCREENSHOTS / "data.png"), full_page=True)


def _chat_beside_the_base_model(page, trained_run: str) -> None:
    """Chat: the 20-step run, with the base model's answer beside it."""
    page.get_by_role("tab", name="Chat").click()
    source = page.locator("#chat-source input")
    source.fill(trained_run)
    source.press("Enter")
    page.wait_for_function(f"document.querySelector('#chat-source-info').innerText.includes('Loaded {trained_run}')")
    page.get_by_label("Compare with the base model").check()
    message = page.locator("#chat-input").get_by_role("textbox")
    message.fill("Tell me if this review is positive or negative: This meal is fantastic.")
    message.press("Enter")
    page.wait_for_function("document.querySelector('#chat-routing').innerText.includes('Router → cluster')")
    page.wait_for_function(
        "document.querySelectorAll('#base-chatbot [data-testid=\"bot\"]').length >= 1 && "
        "document.querySelector('#chat-input textarea').value === ''"
    )
    page.wait_for_timeout(1500)  # the last streamed tokens
    assert "router → cluster" in page.locator("#chatbot").inner_text()
    assert page.locator("#chatbot [data-testid='bot']").last.inner_text().strip(), "an answer"
    page.screenshot(path=str(SCREENSHOTS / "chat.png"), full_page=True)


def _open_an_export(page, exported: dict) -> None:
    """Export: open the export made through the API; its validation and files show."""
    page.get_by_role("tab", name="Export").click()
    existing = page.get_by_label("Open an export")
    existing.click()
    page.get_by_role("option", name=exported["export"]).click()
    page.wait_for_function("document.querySelector('#export-status').innerText.includes('Validation passed')")
    page.screenshot(path=str(SCREENSHOTS / "export.png"), full_page=True)
