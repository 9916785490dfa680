"""The runtime's threshold mode inside the batched dense model, for pass@1 under sparsity.

`eval pass1` generates with `hotcold.model.generate.generate_batch` (many tasks per forward), which the
hybrid runtime does not serve. `ThresholdEmulation` wraps a DenseModel so that every decode step computes
what the runtime's threshold mode computes with the product rule: a layer's hot neurons (a Placement's, or
none) are dense, and a cold neuron j contributes only when |act(g_j) · u_j| > t_l, the layer's threshold
taken from the profile at the wanted sparsity (the exporter's rule). Prefill stays dense, as the runtime's
`prefill="dense"`. The arithmetic is the dense model's (same dtype, same matmuls); only the active set is
the runtime's, so the tokens can differ from the runtime's by rounding, not by rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ThresholdEmulation:
    """model.forward with cold activations at or under t_l zeroed on decode steps (T == 1)."""

    def __init__(self, model: Any, hot_mask: np.ndarray, thresholds: list[float]):
        L, F = model.cfg.n_layers, model.cfg.n_ff
        hot = np.asarray(hot_mask, dtype=bool)
        if hot.shape != (L, F):
            raise ValueError(f"hot mask of shape {hot.shape}, the model has [{L}, {F}]")
        if len(thresholds) != L:
            raise ValueError(f"{len(thresholds)} thresholds for {L} layers")
        self.model = model
        self.hot = torch.as_tensor(hot, device=model.device)
        self.t = [float(v) for v in thresholds]
        self.n_cold = (~self.hot).sum(1).tolist()
        # per layer: cold neurons kept and cold neurons seen (row-tokens x cold neurons), decode steps only
        self.kept = np.zeros(L, dtype=np.float64)
        self.seen = np.zeros(L, dtype=np.float64)

    def __getattr__(self, name: str) -> Any:  # new_cache, max_len, cfg, device, ... are the dense model's
        return getattr(self.model, name)

    def _hook(self, layer: int, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        keep = self.hot[layer] | (a.abs() > self.t[layer])
        n_rows = a.shape[0] * a.shape[1]
        self.kept[layer] += float(keep.sum()) - n_rows * (a.shape[-1] - self.n_cold[layer])
        self.seen[layer] += n_rows * self.n_cold[layer]
        return a * keep

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, cache: Any = None, hook: Any = None,
                last_only: bool = False, pad: torch.Tensor | None = None) -> torch.Tensor:
        if hook is not None:
            raise ValueError("ThresholdEmulation brings its own FFN hook")
        sparse = tokens.shape[1] == 1
        return self.model.forward(tokens, start, cache, hook=self._hook if sparse else None, last_only=last_only,
                                  pad=pad)

    __call__ = forward

    def measured(self) -> dict[str, Any]:
        """The cold side's active fraction on the decode steps so far (1 - the sparsity it ran at)."""
        per = np.where(self.seen > 0, self.kept / np.maximum(self.seen, 1), np.nan)
        tot = float(self.kept.sum() / self.seen.sum()) if self.seen.sum() else None
        return {"cold_active_fraction": tot, "cold_active_fraction_per_layer": [None if np.isnan(v) else round(float(v), 4)
                                                                                for v in per]}
