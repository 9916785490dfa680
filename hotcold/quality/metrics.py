"""Quality of a sparse/hybrid run against the dense model: next-token agreement, KL, perplexity.

All functions take logits as [T, vocab] tensors (a leading batch dimension of 1 is accepted) and
compute in float64 on the logits' device. torch is imported inside the functions (cheap imports).
`teacher_forced_nll` takes a callable, so it works with any model (ours, the bundle runtime, HF).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogitComparison:
    positions: int
    agreement: float  # fraction of positions where argmax(dense) == argmax(other)
    kl_mean: float  # mean over positions of KL(dense || other), nats
    kl_max: float

    def to_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "agreement": self.agreement, "kl_mean": self.kl_mean,
                "kl_max": self.kl_max}


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood over `count` predicted tokens (sums merge across sequences)."""

    total: float
    count: int

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.count else float("nan")

    def __add__(self, other: NLL) -> NLL:
        return NLL(self.total + other.total, self.count + other.count)


def _as_2d(x: Any, name: str):
    import torch

    t = torch.as_tensor(x)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2:
        raise ValueError(f"{name} must be [T, vocab] (or [1, T, vocab]), got shape {tuple(t.shape)}")
    return t


def _pair(dense: Any, other: Any):
    d, o = _as_2d(dense, "dense logits"), _as_2d(other, "other logits")
    if d.shape != o.shape:
        raise ValueError(f"logit shapes differ: dense {tuple(d.shape)} vs other {tuple(o.shape)}")
    return d, o.to(d.device)


def next_token_agreement(dense_logits: Any, other_logits: Any) -> float:
    """Fraction of positions whose greedy next token is the same under both logits."""
    d, o = _pair(dense_logits, other_logits)
    if d.shape[0] == 0:
        return float("nan")
    return (d.argmax(-1) == o.argmax(-1)).double().mean().item()


def kl_divergence(dense_logits: Any, other_logits: Any, reduction: str = "mean"):
    """KL(P_dense || P_other) per position, in nats: `mean` (float), `max` (float) or `none` ([T] tensor)."""
    import torch

    d, o = _pair(dense_logits, other_logits)
    logp = torch.log_softmax(d.double(), -1)
    logq = torch.log_softmax(o.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # clamp: -1e-17 from rounding
    if reduction == "none":
        return kl
    if d.shape[0] == 0:
        return float("nan")
    if reduction == "mean":
        return kl.mean().item()
    if reduction == "max":
        return kl.max().item()
    raise ValueError(f"reduction must be mean, max or none, got {reduction!r}")


def compare_logits(dense_logits: Any, other_logits: Any) -> LogitComparison:
    """Agreement and KL of `other` against `dense` on the same positions."""
    d, o = _pair(dense_logits, other_logits)
    if d.shape[0] == 0:
        return LogitComparison(0, float("nan"), float("nan"), float("nan"))
    kl = kl_divergence(d, o, reduction="none")
    return LogitComparison(d.shape[0], next_token_agreement(d, o), kl.mean().item(), kl.max().item())


def nll(logits: Any, targets: Any) -> NLL:
    """Summed cross-entropy of `targets` [T] under `logits` [T, vocab] (position t predicts targets[t])."""
    import torch

    lg = _as_2d(logits, "logits")
    tg = torch.as_tensor(targets, device=lg.device).reshape(-1).long()
    if tg.shape[0] != lg.shape[0]:
        raise ValueError(f"{lg.shape[0]} logit rows but {tg.shape[0]} targets")
    if tg.numel() and (tg.min() < 0 or tg.max() >= lg.shape[1]):
        raise ValueError(f"target ids must be in [0, {lg.shape[1]})")
    total = torch.nn.functional.cross_entropy(lg.double(), tg, reduction="sum").item() if tg.numel() else 0.0
    return NLL(total, int(tg.numel()))


def perplexity(logits: Any, targets: Any) -> float:
    """exp(mean cross-entropy) of `targets` under `logits`."""
    return nll(logits, targets).perplexity


def teacher_forced_nll(logits_fn: Callable[[Any], Any], token_ids: Sequence[int] | Any, start: int) -> NLL:
    """NLL of tokens token_ids[start:] given everything before them, in one forward pass.

    `logits_fn(ids)` gets a 1-D LongTensor of all T ids and returns [T, vocab] logits (or [1, T, vocab]),
    where row t predicts ids[t + 1]. `start` is the first scored position (e.g. the prompt's length),
    1 <= start <= T.
    """
    import torch

    ids = torch.as_tensor(token_ids).reshape(-1).long()
    n = ids.shape[0]
    if not 1 <= start <= n:
        raise ValueError(f"start must be in [1, {n}] for {n} tokens, got {start}")
    if start == n:
        return NLL(0.0, 0)
    with torch.no_grad():
        logits = _as_2d(logits_fn(ids), "logits_fn output")
    if logits.shape[0] != n:
        raise ValueError(f"logits_fn returned {logits.shape[0]} rows for {n} tokens")
    return nll(logits[start - 1 : n - 1], ids[start:].to(logits.device))
