"""The LM head only where a position needs logits: large vocabularies, fast on a CPU.

Gemma 3's head is 262,144 x 640, 168M of its 268M parameters. Computing logits at every
position dominates a CPU step and holds (tokens x vocab) floats, though only the assistant's
tokens carry loss. So the model's forward returns its final hidden states instead of logits
(`deferred_head`), the head runs on the labelled positions only, and the cross-entropy runs in
chunks whose logits are recomputed in backward (`label_losses`): the trick Liger and Unsloth
use for memory, written here because their kernels are CUDA-only and model-specific.

`contiguous_head_inputs` fixes a second, separate cost: with `logits_to_keep=1` (generation's
prefill, the gate pass) the head's input is the slice hidden[:, -1:, :], and torch's CPU bf16
F.linear takes a slow path on a non-contiguous input: (16, 1, 640) x (262144, 640) ran 12.6 s
sliced against 45 ms contiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hydra_edge.data.records import IGNORE_INDEX

# A context for a forward beside the one being trained: model -> context manager.
SideForward = Callable[..., AbstractContextManager]

# Logit elements one chunk may hold: 2^24 float32 = 64 MB (64 positions of Gemma's vocabulary).
CHUNK_ELEMENTS = 1 << 24


def _unwrap(model):
    """The Hugging Face model inside a DistributedDataParallel wrapper, if any."""
    return getattr(model, "module", model)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_inputs(model) -> None:
    """Makes the LM head's input contiguous before its matmul (idempotent)."""
    head = _unwrap(model).get_output_embeddings()
    if head is not None and not getattr(head, "_hydra_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._hydra_contiguous = True


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of final hidden states, as the model's own forward would give them:
    the head, then Gemma-style soft-capping where the config sets it. (..., H) -> (..., V).

    Outside autocast the states are cast to the head's dtype first: a forward wrapped for
    mixed precision (accelerate's autocast plus outputs cast to float32, which the model keeps
    while it trains, held-out passes included) hands back float32 states, and a bf16 head
    refuses them."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if head.weight.dtype.is_floating_point and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(head.weight.dtype)
    logits = head(hidden).float()
    cap = getattr(inner.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextmanager
def deferred_head(model):
    """While active, model(...).logits holds the final hidden states (B, T, H), not logits.

    The head's forward is replaced on the instance (its hooks still run) and soft-capping is
    switched off in the config, since head_logits() applies it."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    config = inner.config
    cap = getattr(config, "final_logit_softcapping", None)
    head.forward = _identity
    if cap:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward
        if cap:
            config.final_logit_softcapping = cap


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def supports_deferred_head(model, input_ids: torch.Tensor, side_forward: SideForward = nullcontext) -> bool:
    """Whether deferral reproduces the model's own logits, checked once per model on a few
    tokens: an architecture that transforms logits after the head in another way (a scale,
    say) keeps the full head instead of training on wrong logits. The probe runs inside
    `side_forward(model)`: a model in training passes the adapter's `training_switches_paused`, so
    switches set for the batch being trained do not see the probe."""
    inner = _unwrap(model)
    known = getattr(inner, "_hydra_deferred_head_ok", None)
    if known is not None:
        return known
    probe = input_ids[:1, :8]
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), side_forward(inner):
            expected = inner(input_ids=probe, use_cache=False).logits.float()
            with deferred_head(inner):
                hidden = inner(input_ids=probe, use_cache=False).logits
            got = head_logits(inner, hidden)
    finally:
        inner.train(was_training)
    # bf16 models round soft-capped logits differently (capping in bf16 vs float32): ~1e-2.
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    ok = got.shape == expected.shape and bool(torch.allclose(got, expected, atol=1e-3 * max(scale, 1.0), rtol=2e-2))
    inner._hydra_deferred_head_ok = ok
    return ok


def label_losses(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every labelled next-token prediction, computing the head on those
    positions only and in chunks of CHUNK_ELEMENTS logits (recomputed in backward when
    gradients are on). hidden (B, T, H), labels (B, T) with IGNORE_INDEX where no loss ->
    (losses (n,) float32, rows (n,) long: the batch row of each)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    valid = targets != IGNORE_INDEX  # (B, T-1)
    rows = valid.nonzero()[:, 0]  # (n,)
    selected = hidden[:, :-1][valid]  # (n, H)
    wanted = targets[valid]  # (n,)
    vocab = _unwrap(model).get_output_embeddings().weight.shape[0]
    step = max(1, CHUNK_ELEMENTS // vocab)
    pieces = []
    for start in range(0, selected.shape[0], step):
        h, y = selected[start : start + step], wanted[start : start + step]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_losses, model, h, y, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(model, h, y))
    losses = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return losses, rows


def _chunk_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, H), (n,) -> (n,) float32 cross-entropy."""
    return F.cross_entropy(head_logits(model, hidden), targets, reduction="none")


def mean_label_loss(model, batch: dict, side_forward: SideForward = nullcontext) -> torch.Tensor:
    """The mean cross-entropy over the batch's label tokens, as model(**batch).loss gives it,
    with the head on labelled positions only (the full head where deferral is unsupported)."""
    if not supports_deferred_head(model, batch["input_ids"], side_forward):
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with deferred_head(model):
        hidden = model(**inputs, use_cache=False).logits  # (B, T, H)
    losses, _ = label_losses(model, hidden, batch["labels"])
    if losses.numel() == 0:  # nothing to learn from, but backward still needs a graph
        return hidden.float().sum() * 0.0
    return losses.sum() / losses.numel()
