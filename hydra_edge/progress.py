"""Progress lines for the phases after training (gate pass, held-out loss, answers), so a slow
phase on a big model is never a silent wait: `<phase>: rows 32/79, tokens/s 410, eta 25s`."""

from __future__ import annotations

import os
import sys
import time


class PhaseProgress:
    """Counts rows and tokens of one phase; prints a line at most every `every_s` seconds, and
    one at the end. Only the main process prints (RANK, as finetune's log)."""

    def __init__(self, phase: str, total_rows: int, every_s: float = 10.0, stream=None) -> None:
        self.phase, self.total, self.every_s = phase, total_rows, every_s
        self.stream = stream or sys.stderr
        self.rows = self.tokens = 0
        self.started = self.last_print = time.perf_counter()
        self.enabled = os.environ.get("RANK", "0") == "0"

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        now = time.perf_counter()
        if self.rows >= self.total or now - self.last_print >= self.every_s:
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        if not self.enabled:
            return
        elapsed = max(now - self.started, 1e-9)
        eta = elapsed / max(self.rows, 1) * (self.total - self.rows)
        print(
            f"{self.phase}: rows {self.rows}/{self.total}, tokens/s {self.tokens / elapsed:.0f}, "
            f"{'done in' if self.rows >= self.total else 'eta'} {elapsed if self.rows >= self.total else eta:.0f}s",
            file=self.stream,
            flush=True,
        )
