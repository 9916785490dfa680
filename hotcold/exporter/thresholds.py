"""Activation thresholds t_l of the runtime's `threshold` and `predictor` modes (design.md §1).

Two rules (format.py): `gate` (|act(W_gate x)| > t_l, CATS) and `product` (|act(W_gate x)·(W_up x)| > t_l,
the profiler's `magnitude` definition). Where t_l comes from:

    given       one value for every layer, or one per layer
    histograms  `product` rule: the Profile's |a| histograms, inverse CDF at the target sparsity
                (Profile.magnitude_thresholds) — no weights needed
    samples     `gate` rule: the Profile's sampled FFN inputs x, through this layer's gate rows, exact
                quantile at the target sparsity (the profile's histograms are of the product, not the gate)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.errors import InputError
from hotcold.bundle import RULES, given_thresholds  # noqa: F401 (re-exported)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise InputError(f"unknown activation rule {rule!r}", f"use one of: {', '.join(RULES)}")
    return rule


def act_fn(activation: str):
    return F.silu if activation == "silu" else F.relu


def magnitudes(rule: str, activation: str, x: torch.Tensor, gate: torch.Tensor,
               up: torch.Tensor | None = None) -> torch.Tensor:
    """|act(g)| (gate) or |act(g)·u| (product) for FFN inputs x [n, D] -> [n, F] float32."""
    g = act_fn(activation)(F.linear(x.float(), gate.float()))
    if rule == "product":
        g = g * F.linear(x.float(), up.float())
    return g.abs()


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of all values (linear interpolation, like numpy's default)."""
    v = values.reshape(-1).double().numpy()
    if v.size == 0:
        raise InputError("no samples to calibrate a threshold from", "profile with --samples N (e.g. 4096)")
    return float(np.quantile(v, q))


def histogram_phase(profile: Any, phase: str) -> str:
    """`decode` when the profile has decode histograms, else `all`."""
    if phase == "decode" and not int(np.asarray(profile.hist_decode).sum()):
        return "all"
    return phase


def from_histograms(profile: Any, sparsity: float, phase: str = "decode") -> list[float]:
    """`product` rule: t_l from the Profile's |a| histograms (inverse CDF at `sparsity`)."""
    return [float(t) for t in profile.magnitude_thresholds(sparsity, histogram_phase(profile, phase))]


def sample_inputs(profile: Any, layer: int) -> torch.Tensor:
    """The profile's sampled FFN inputs of `layer`, [n, D] float32 (InputError when it has none)."""
    x = getattr(profile, "samples", {}).get("x") if profile is not None else None
    if x is None or len(x) == 0:
        where = getattr(profile, "path", None) or "the profile"
        raise InputError(f"{where} has no sampled FFN inputs, which the `gate` rule and predictors are "
                         "calibrated on", "re-profile with --samples 4096, or export with --rule product")
    return torch.from_numpy(np.ascontiguousarray(x[:, layer])).float()
