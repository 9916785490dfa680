"""Activation definitions: when is FFN neuron i "active" on a token (design.md §1, the activation threshold).

With a = act(W_gate x) * (W_up x) the FFN's intermediate activation of one token ([n_ff] per layer):

    product    |a_i| > t_l       CATS/TEAL-style (a = act(g)·u: the exporter's and runtime's `product` rule),
                                 t_l per layer: one absolute value for every layer (--threshold), given per
                                 layer (--thresholds-from), or calibrated so that a target fraction of |a|
                                 values on calibration prompts falls below it (--sparsity)
    sign       W_gate x > 0      the gate's sign (silu(g) > 0 iff g > 0); the gate is recomputed from x
    relu       a_i != 0          for ReLU / ReGLU models (a ReLU FFN's a_i > 0; ReGLU's relu(g_i)·u_i != 0):
                                 exactly the neurons a runtime may not skip

The runtime's other rule, `gate` (|act(g_i)| > t_l), is chosen at export (`hotcold export --rule gate`): its
t_l come from the profile's samples, so the profiler needs no definition of its own for it.

Every profile also records |a| histograms (HIST_* in artifact.py) whatever the definition, so any
product-rule threshold can be derived later without re-profiling.

Profiles written before these names had `magnitude` for `product` and `gate` for `sign`; `kind_of()` reads
both (the manifests are not rewritten: their content hash is what placements refer to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hotcold.errors import InputError
from hotcold.profiler.artifact import HIST_BINS, HIST_HI, HIST_LO

if TYPE_CHECKING:
    import torch

    from hotcold.model.config import ModelConfig

KINDS = ("product", "sign", "relu")
_OLD_NAMES = {"magnitude": "product", "gate": "sign"}  # in profile manifests written before the renaming


def kind_of(activation: dict[str, Any] | None) -> str | None:
    """A profile manifest's activation definition under today's names."""
    k = (activation or {}).get("kind")
    return _OLD_NAMES.get(k, k)
# CATS (Lee et al. 2024) sparsifies SwiGLU FFNs at 50% with little quality loss and TEAL (Liu et al.
# 2024) reports 40-50% as near-lossless on LLaMA-2/3: the default target when none is given.
DEFAULT_SPARSITY = 0.5
HISTOGRAM = {"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS}


@dataclass(frozen=True)
class ActivationSpec:
    """What the user asked for. `resolve()` turns it into per-layer thresholds (after calibration)."""

    kind: str = "product"
    threshold: float | None = None  # product: one absolute t for every layer
    sparsity: float | None = None  # product: target fraction of |a| below t_l, calibrated per layer
    thresholds: tuple[float, ...] | None = None  # product: t_l given per layer (e.g. from another profile)

    def __post_init__(self):
        if self.kind == "magnitude":
            raise InputError("--activation magnitude is called product now (|act(gate)·up| > t_l, as the exporter's "
                             "rule)", "pass --activation product")
        if self.kind == "gate":
            raise InputError("--activation gate: the profiler counts the gate's sign as `sign` (W_gate x > 0); the "
                             "rule |act(gate)| > t_l is chosen at export (hotcold export --rule gate)",
                             "pass --activation sign, or profile with product and export with --rule gate")
        if self.kind not in KINDS:
            raise InputError(f"unknown activation definition {self.kind!r}", f"use one of: {', '.join(KINDS)}")
        given = [n for n, v in (("--threshold", self.threshold), ("--sparsity", self.sparsity),
                                ("--thresholds-from", self.thresholds)) if v is not None]
        if self.kind != "product" and given:
            raise InputError(f"{' and '.join(given)} only apply to --activation product (got {self.kind})",
                             f"drop {' and '.join(given)} or use --activation product")
        if self.threshold is not None and self.sparsity is not None:
            raise InputError("both --threshold and --sparsity were given",
                             "pass one: an absolute threshold, or a target sparsity to calibrate per layer")
        if self.threshold is not None and self.thresholds is not None:
            raise InputError("both --threshold and per-layer thresholds were given", "pass one of them")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise InputError(f"--threshold must be a finite number >= 0, got {self.threshold}",
                             "pass e.g. --threshold 0.01")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise InputError(f"--sparsity must be in [0, 1), got {self.sparsity}", "pass a fraction such as 0.5")
        if self.thresholds is not None and not all(math.isfinite(t) and t >= 0 for t in self.thresholds):
            raise InputError("per-layer thresholds must be finite numbers >= 0", "check the thresholds' source")

    @property
    def target_sparsity(self) -> float | None:
        if self.kind != "product" or self.threshold is not None or self.thresholds is not None:
            return self.sparsity
        return self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY

    @property
    def needs_calibration(self) -> bool:
        return self.kind == "product" and self.threshold is None and self.thresholds is None

    def check_model(self, cfg: ModelConfig) -> None:
        if self.kind == "relu" and cfg.activation != "relu":
            raise InputError(f"--activation relu counts a_i != 0, but this model's FFN uses {cfg.activation} "
                             "(never exactly zero), so every neuron would count as active",
                             "use --activation product (or sign) for SwiGLU models")
        if self.thresholds is not None and len(self.thresholds) != cfg.n_layers:
            raise InputError(f"{len(self.thresholds)} per-layer thresholds given for a model with "
                             f"{cfg.n_layers} layers", "take the thresholds from a profile of this model")

    def layer_thresholds(self, cfg: ModelConfig) -> list[float] | None:
        """t_l for every layer when known without calibration; None for sign/relu."""
        if self.kind != "product":
            return None
        if self.thresholds is not None:
            return [float(t) for t in self.thresholds]
        if self.threshold is not None:
            return [float(self.threshold)] * cfg.n_layers
        raise ValueError("thresholds need calibration")

    def to_json(self) -> dict[str, Any]:
        """What the user asked for (part of a run's identity, used for resuming)."""
        return {"kind": self.kind, "threshold": self.threshold, "sparsity": self.target_sparsity,
                "thresholds": None if self.thresholds is None else list(self.thresholds)}


def manifest_entry(kind: str, thresholds: list[float] | None, target_sparsity: float | None) -> dict[str, Any]:
    """The Profile manifest's "activation": what decides compatibility of two profiles."""
    return {"kind": kind, "thresholds": None if thresholds is None else [float(t) for t in thresholds],
            "target_sparsity": target_sparsity}


def hist_index(abs_a: torch.Tensor, lo: float = HIST_LO, hi: float = HIST_HI, bins: int = HIST_BINS,
               inplace: bool = False) -> torch.Tensor:
    """Histogram bin of each |a| (flattened, int32): 0 below lo (zeros included), 1..bins log-spaced as
    artifact.hist_edges, bins + 1 at or above hi. `inplace` overwrites abs_a (saves a copy)."""
    import torch

    scale = bins / math.log10(hi / lo)
    # 1 + (log10|a| - log10 lo) * scale, clamped to [0, bins + 1]: non-negative, so truncation is floor
    idx = (abs_a.log10_() if inplace else abs_a.log10()).mul_(scale).add_(1.0 - math.log10(lo) * scale)
    return idx.clamp_(0, bins + 1).nan_to_num_(nan=0.0).to(dtype=torch.int32).reshape(-1)
