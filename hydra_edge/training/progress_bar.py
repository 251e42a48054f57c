"""What a training run shows on stderr: a progress bar (plain lines when piped), each held-out
eval's line, and a one-line warning when the heads have collapsed."""

from __future__ import annotations

import sys
import time

from hydra_edge.training.held_out import COLLAPSED_HEAD_COSINE, EarlyStopping

# What the warning suggests: the measured configuration whose heads specialise (docs/heads.md).
SPECIALISING_FLAGS = "--head-init random --head-dropout 0.1 --router-temperature 0.1 --router-loss 0.1"


def eval_line(scores: dict, stopping: EarlyStopping) -> str:
    """The progress bar's line for an eval row: held-out loss, exact-match, the best step, and
    the router's health (routing spread, head cosine) where the row has them."""
    em, loss = scores["eval_exact_match"], scores["eval_loss"]
    best = f", best step {stopping.best_step}" if stopping.best_step is not None else ""
    summary = scores.get("router_summary") or {}
    spread, cosine = summary.get("routing_spread"), summary.get("head_cosine")
    return (
        f"eval: step {scores['step']} held-out loss "
        + (f"{loss:.4f}" if loss is not None else "n/a (no answer tokens)")
        + (f", exact-match {100 * em:.1f} % of {scores['eval_em_rows']}" if em is not None else "")
        + best
        + (f", routing spread {spread:.3f}" if spread is not None else "")
        + (f", head cosine {cosine:.2f}" if cosine is not None else "")
    )


def collapse_warning(scores: dict) -> str:
    """One line for an eval row where heads_collapsed holds: what happened and the flags that
    keep the heads apart (adapter/layer.py's symmetry breaking)."""
    cosine = scores["router_summary"]["head_cosine"]
    return (
        f"warning: the heads have collapsed (mean head cosine {cosine:.2f} > {COLLAPSED_HEAD_COSINE:g} at step "
        f"{scores['step']}): HydraLoRA is training as one LoRA; "
        f"{SPECIALISING_FLAGS} make them specialise (see docs/heads.md for what that costs)"
    )


class ProgressBar:
    """A tqdm bar on a terminal (step, loss, lr, tokens/s, ETA); plain lines when piped, so a log
    file gets about twenty of them instead of one per step."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.enabled, self.started, self.first = total, enabled, time.perf_counter(), initial
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            return
        step = row["step"]
        if step % self.every == 0 or step == self.total:
            done = step - self.first
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            print(
                f"train: step {step}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"tokens/s {row['tokens_per_s']:.0f} eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def note(self, line: str) -> None:
        """A line of its own (an eval result), above the bar on a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
