"""The HydraLoRA layer: one shared A, N stacked B heads and a per-token router.

    y = W0·x + (alpha / r) · Σ_i g_i(x) · B_i · A · dropout(x)      g(x) = softmax(W_router · x / T)

Symmetry breaking (why the heads can differ at all): with zero heads and near-uniform gates every
head gets the same gradient, Adam turns that into the same update, and identical heads give the
router no gradient, so the heads stay alike and HydraLoRA is a LoRA with N times the cost. Three
levers, all options (training/config.py): `head_init random` starts every head distinct (R-LoRA's scale)
and centred, `Σ_i B_i = 0`, with the router at zero, so the gates start uniform and the adapted
model starts exactly at the base with no offset to store or export; `head_dropout` drops A·x with
an independent mask per head, so even equal heads get different gradients; and the router's
temperature T, top-k (a straight-through estimator: the forward uses the k largest gates
renormalised, the backward the softmax's gradient) and the balance-and-certainty loss
(`switches.router_balance`) shape how decisively tokens pick heads.

Like PEFT's LoRA layer, it *wraps* the base layer (`self.base_layer`) instead of copying its
weight, so the same code serves `nn.Linear` and bitsandbytes `Linear4bit` (see `quant.py`).

The heads are applied with one matmul: h = A·x is computed once, scaled by each gate, and the
`(B, T, N·r)` result is multiplied by the heads concatenated into `(N·r, out)`. A
`(B, T, N, out)` tensor is never built: at N heads it would cost N times the output's memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hydra_edge.choices import HEAD_INITS


class HydraLoRALinear(nn.Module):
    """Wraps a linear layer with a HydraLoRA branch; only the branch is trainable."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        heads: int,
        dropout: float = 0.0,
        head_init: str = "zero",
        head_dropout: float = 0.0,
        router_temperature: float = 1.0,
        router_top_k: int = 0,
    ) -> None:
        super().__init__()
        if rank < 1 or heads < 1:
            raise ValueError(f"rank and heads must be >= 1, got {rank} and {heads}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if router_temperature <= 0 or not 0 <= router_top_k <= heads:
            raise ValueError(f"router_temperature must be > 0 and router_top_k in 0..{heads}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.rank = rank
        self.alpha = float(alpha)
        self.heads = heads
        self.scaling = self.alpha / rank
        self.head_init = head_init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Per-head dropout on A·x: one independent mask per head (R-LoRA).
        self.head_dropout = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()
        self.router_temperature = float(router_temperature)
        self.router_top_k = int(router_top_k)  # 0 or N: every head
        # Adapter weights live in float32 (master copy); autocast runs the matmuls in bf16.
        self.hydra_A = nn.Parameter(torch.empty(rank, self.in_features))  # (r, in)
        self.hydra_B = nn.Parameter(torch.empty(heads, self.out_features, rank))  # (N, out, r)
        self.hydra_router = nn.Parameter(torch.empty(heads, self.in_features))  # (N, in)
        # When a list, forward() appends the float32 gates (B, T, N) it computed; used to
        # measure per-cluster mean gates after training.
        self.gate_sink: list[torch.Tensor] | None = None
        # When set ((N,) float32), every token uses these gates instead of the router's: the
        # per-cluster merge that export ships (B̄_c = Σ_i ḡ_{c,i} B_i), computed in PyTorch.
        self.fixed_gates: torch.Tensor | None = None
        # Router supervision (training only): when set ((B, T) long, -1 = no target), forward()
        # appends to router_losses the summed -log gate of each token's cluster head, and the
        # count of tokens it covers. See train.router_supervision.
        self.router_targets: torch.Tensor | None = None
        self.router_losses: list[tuple[torch.Tensor, int]] = []
        # Balance-and-certainty loss (training only): when set ((B, T) bool, the real tokens),
        # forward() appends this layer's (mean token gate entropy - entropy of the mean gates)
        # / log N to balance_losses. See switches.router_balance.
        self.balance_tokens: torch.Tensor | None = None
        self.balance_losses: list[torch.Tensor] = []
        # Pooled gates (training only): when set, a pair of (B, T) tensors: each token's group
        # (ids unique across the batch, -1 on padding) and whether its gates count toward its
        # group's mean. Every token then gets its group's mean gates: the constant gating a
        # per-cluster export applies, so training can optimise it too (--pooled-steps).
        self.pool_groups: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_adapter_parameters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """zero: the reference init (A and router kaiming-uniform(a=√5), heads zero).
        random: A kaiming, every head normal at R-LoRA's stable scale (std r^¼ / (8·√out), its
        "unit" init times (r^¼/√γ) with γ = 64), then centred so Σ_i B_i = 0, and the router zero.
        Uniform gates then mix the heads to exactly zero, so the adapted model starts at the base
        (R-LoRA subtracts the heads' mean product from W instead; on a 4-bit base W cannot take
        it, and a stored offset would have to ride along into every export). One head cannot be
        centred and starts at zero, as LoRA's B does."""
        nn.init.kaiming_uniform_(self.hydra_A, a=math.sqrt(5))
        if self.head_init == "zero":
            nn.init.kaiming_uniform_(self.hydra_router, a=math.sqrt(5))
            nn.init.zeros_(self.hydra_B)
            return
        nn.init.zeros_(self.hydra_router)
        std = self.rank**0.25 / (8.0 * math.sqrt(self.out_features))
        nn.init.normal_(self.hydra_B, std=std)  # (N, out, r)
        self.hydra_B.sub_(self.hydra_B.mean(dim=0, keepdim=True))
        if self.heads > 1:  # centring shrank each head by √((N-1)/N)
            self.hydra_B.mul_(math.sqrt(self.heads / (self.heads - 1)))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token head weights, computed in float32 on the raw input. (..., in) -> (..., N)."""
        if self.fixed_gates is not None:
            return self.fixed_gates.to(x.device, torch.float32).expand(*x.shape[:-1], self.heads)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.hydra_router.float()) / self.router_temperature  # (B, T, N)
            if self.router_targets is not None:
                self._supervise_router(logits)
            gates = torch.softmax(logits, dim=-1)  # (B, T, N)
            if self.balance_tokens is not None:
                self._balance_router(gates)
            if 0 < self.router_top_k < self.heads:
                gates = top_k_gates(gates, self.router_top_k)
            if self.pool_groups is not None:
                groups, sources = (t.to(gates.device) for t in self.pool_groups)
                gates = _pool_by_group(gates, groups, sources)
            return gates

    def _balance_router(self, gates: torch.Tensor) -> None:
        """HMoRA's balance-and-certainty objective over the real tokens, in units of log N: the
        mean entropy of a token's gates (low: each token picks heads decisively) minus the entropy
        of the gates averaged over the tokens (high: every head gets used). Minimising it is
        maximising the information the router carries about which head a token needs.
        gates (B, T, N) float32."""
        real = self.balance_tokens.to(gates.device)  # (B, T) bool
        g = gates[real]  # (n, N)
        if g.shape[0] == 0 or self.heads < 2:
            return
        per_token = gate_entropy(g).mean()
        overall = gate_entropy(g.mean(0))
        self.balance_losses.append((per_token - overall) / math.log(self.heads))

    def _supervise_router(self, logits: torch.Tensor) -> None:
        """Cross-entropy of the router against each token's data cluster. (B, T, N) logits."""
        targets = self.router_targets.to(logits.device)  # (B, T), -1 where no target
        nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="sum")
        self.router_losses.append((nll, int((targets >= 0).sum())))

    def merged_head(self, gates: torch.Tensor) -> torch.Tensor:
        """The heads collapsed for constant gates: B̄ = Σ_i g_i · B_i, so the branch is the plain
        LoRA scaling · B̄ · A. This is the per-cluster merge every export ships (with a cluster's
        mean gates ḡ_c) and what a forward with `fixed_gates` computes. (N,) -> (out, r) float32."""
        return torch.einsum("n,nor->or", gates.to(self.hydra_B.device, torch.float32), self.hydra_B.float())

    def delta_weight(self, gates: torch.Tensor) -> torch.Tensor:
        """What the branch adds to the base weight when every token uses these gates:
        scaling · B̄ · A (PEFT's `get_delta_weight`). (N,) -> (out, in) float32."""
        return self.scaling * (self.merged_head(gates) @ self.hydra_A.float())

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The HydraLoRA branch alone. (B, T, in) -> (B, T, out)."""
        if self.fixed_gates is not None and self.gate_sink is None and not self.training:
            return self._merged_delta(x)
        gates = self.gates(x)  # (B, T, N) float32
        if self.gate_sink is not None:
            self.gate_sink.append(gates.detach())
        compute_dtype = _compute_dtype(x, self.hydra_A)
        h = F.linear(self.dropout(x).to(compute_dtype), self.hydra_A.to(compute_dtype))  # (B, T, r)
        gated = (gates.to(compute_dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (B, T, N·r)
        gated = self.head_dropout(gated)  # an independent mask for each head's copy of A·x
        # (N, out, r) -> (N, r, out) -> (N·r, out): row n·r + j of B_cat is head n, column j.
        heads_cat = self.hydra_B.to(compute_dtype).transpose(1, 2).reshape(-1, self.out_features)
        return (gated @ heads_cat) * self.scaling  # (B, T, out)

    def _merged_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The branch with constant gates, through the merged head: one (r, out) matmul instead of
        N gated copies of A·x. (B, T, in) -> (B, T, out)."""
        compute_dtype = _compute_dtype(x, self.hydra_A)
        h = F.linear(self.dropout(x).to(compute_dtype), self.hydra_A.to(compute_dtype))  # (B, T, r)
        merged = self.merged_head(self.fixed_gates).to(compute_dtype)  # (out, r)
        return F.linear(h, merged) * self.scaling  # (B, T, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base_layer(x)
        return base_out + self.adapter_delta(x).to(base_out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, "
            f"heads={self.heads}, alpha={self.alpha:g}, head_init={self.head_init}, "
            f"router_temperature={self.router_temperature:g}, router_top_k={self.router_top_k}"
        )


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each gate vector: 0 when one head takes everything, log N when all
    weigh the same. (..., N) -> (...)."""
    return -(gates * gates.clamp_min(1e-12).log()).sum(dim=-1)


def top_k_gates(gates: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest gates of each token renormalised to sum to 1, the rest zero, with the
    softmax's gradient (straight-through): the forward routes hard, the backward still tells
    every head's router row how it would have done. (..., N) -> (..., N)."""
    top = gates.topk(k, dim=-1).indices  # (..., k)
    kept = torch.zeros_like(gates).scatter(-1, top, 1.0) * gates  # (..., N)
    hard = kept / kept.sum(dim=-1, keepdim=True)
    return gates + (hard - gates).detach()


def _pool_by_group(gates: torch.Tensor, groups: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Every token's gates replaced by the mean over the source tokens of its group (groups may
    span rows; a group without sources uses all its tokens); padding (-1) gets zeros.
    gates (B, T, N) float32, groups (B, T) long, sources (B, T) bool -> (B, T, N)."""
    flat = gates.reshape(-1, gates.shape[-1])  # (B·T, N)
    ids = groups.reshape(-1)  # (B·T,)
    member = F.one_hot(ids.clamp_min(0), int(ids.max()) + 1).float() * (ids >= 0).unsqueeze(-1)  # (B·T, G)
    counted = member * sources.reshape(-1, 1).float()  # (B·T, G)
    # A group with no source token (say a row trained on every token) pools over all its tokens.
    counted = torch.where(counted.sum(dim=0, keepdim=True) > 0, counted, member)  # (B·T, G)
    means = (counted.T @ flat) / counted.sum(dim=0).unsqueeze(-1).clamp_min(1.0)  # (G, N)
    return (member @ means).reshape(gates.shape)  # (B, T, N)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the branch's matmuls run in: autocast's when active, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype.is_floating_point else weight.dtype
