"""The optimizer and the learning-rate schedule, from the libraries that keep them: AdamW from
torch or bitsandbytes (8-bit states: a quarter of AdamW's optimizer memory), the schedules from
`transformers.get_scheduler`, so they are the ones Trainer, TRL and axolotl users know.
"""

from __future__ import annotations

import torch

from hydra_edge.errors import UserError

# --lr-scheduler -> transformers' name; "constant" warms up first when there is a warmup.
SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "cosine_with_min_lr": "cosine_with_min_lr"}


def build_optimizer(params: list[torch.nn.Parameter], optim: str, lr: float, weight_decay: float):
    if optim == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb

        optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optim]
        return optimizer_class(params, lr=lr, weight_decay=weight_decay)
    except (ImportError, RuntimeError, AttributeError) as exc:
        raise UserError(
            f"--optim {optim}: bitsandbytes cannot run it on this device ({exc}); use --optim adamw"
        ) from exc


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_rate: float):
    """A LambdaLR (its state is a step count, so checkpoints restore it exactly)."""
    from transformers import get_scheduler

    if name == "constant":
        hf_name = "constant_with_warmup" if warmup_steps else "constant"
    else:
        hf_name = SCHEDULER_NAMES[name]
    extra = {"min_lr_rate": min_lr_rate} if name == "cosine_with_min_lr" else None
    return get_scheduler(
        hf_name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
