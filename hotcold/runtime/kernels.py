"""The CPU worker's kernels over the row-bundled cold layout (cold_up_down: row j = [up_j | down_j]).

A kernel is an object with two methods; the runtime takes one by name or as an object
(`HybridModel(kernel=...)`), so a compiled gather-dot (numba, C++) can replace the torch one without
touching the runtime:

    up_down(x [N, D], coef [N, m], idx [m] int64, up_down [c, 2D]) -> y [N, D]
        y = Σ_j coef[:, j] · (up_idx[j] · x) · down_idx[j]      (coef = act(gate) of the active neurons,
                                                                  0 where a token's neuron is inactive)
    down(a [N, m], idx [m] int64, up_down [c, 2D]) -> y [N, D]
        y = Σ_j a[:, j] · down_idx[j]                            (the product rule: a already known)

`TorchGather` gathers the active neurons' bundled rows into one block (index_select) and runs dense
torch ops on it — what works on CPU with torch alone (issue 5); `dense_cold` is the exact path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchGather:
    name = "torch-gather"

    def up_down(self, x: torch.Tensor, coef: torch.Tensor, idx: torch.Tensor, up_down: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        blk = up_down.index_select(0, idx)  # [m, 2D]: one contiguous block per active neuron
        u = F.linear(x, blk[:, :D])  # [N, m]
        return F.linear(coef * u, blk[:, D:].t())  # [N, D]

    def down(self, a: torch.Tensor, idx: torch.Tensor, up_down: torch.Tensor) -> torch.Tensor:
        D = up_down.shape[1] // 2
        blk = up_down.index_select(0, idx)
        return F.linear(a, blk[:, D:].t())


KERNELS = {TorchGather.name: TorchGather}


def get_kernel(kernel: str | object | None):
    from hotcold.errors import InputError

    if kernel is None:
        return TorchGather()
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise InputError(f"unknown CPU kernel {kernel!r}", f"use one of: {', '.join(KERNELS)}")
        return KERNELS[kernel]()
    return kernel


def dense_cold(x: torch.Tensor, gate: torch.Tensor, up_down: torch.Tensor, act) -> torch.Tensor:
    """Every cold neuron (exact mode, and dense prefill): y = (act(x G^T) * (x U^T)) Down."""
    D = x.shape[-1]
    a = act(F.linear(x, gate)) * F.linear(x, up_down[:, :D])
    return F.linear(a, up_down[:, D:].t())
