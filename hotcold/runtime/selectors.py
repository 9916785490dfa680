"""Who picks the active cold neurons in `predictor` mode (the GPU side, before the CPU exchange).

A selector has `cold_mask(engine, layer, x) -> uint8 [C]` (1 = compute this cold slot) and
`hot_active(engine, layer, x) -> float [k]` (its decision for the hot slots, for the dynamic mode's
statistics). Both run inside the engine's CUDA graphs, so they use static tensors only.

- `SampledPredictor` — for the random-weight benchmark model: a low-rank predictor of realistic size
  (Linear(D, r) -> ReLU -> Linear(r, n_ff), Deja Vu / PowerInfer style) is evaluated on every token so
  its time is paid in full, but its random weights predict nothing, so the decisions are *sampled* from
  per-neuron activation probabilities (a bank of uniform draws compared with p; the bank row is chosen
  by position). design.md §5 allows this for the 70B benchmark; every result made with it says so.
  `set_probabilities` changes p in place (a workload shift) without re-capturing graphs.
- `OracleSelector` — the exact gate rule |silu(W_gate x)| > t_l computed on the GPU side from a full
  copy of the gate rows: for tests (predictor mode == threshold mode), not a deployable predictor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SampledPredictor:
    def __init__(self, probs: np.ndarray, dim: int, rank: int, device, dtype: torch.dtype, bank_rows: int = 128,
                 seed: int = 0):
        """probs [L, n_ff]: activation probability of each neuron (id order) in the running workload."""
        L, n_ff = probs.shape
        g = torch.Generator(device=device).manual_seed(seed)
        self.rank = rank
        self.p = torch.as_tensor(probs, dtype=torch.float32).to(device).contiguous()
        # float16 uniforms: the bank is the benchmark's stand-in for real decisions and sits on the GPU beside
        # the model (80 layers x 32 rows x 28,672 neurons = 147 MB at 2 bytes)
        self.bank = torch.rand(L, bank_rows, n_ff, generator=g, device=device, dtype=torch.float16)
        self.w1 = [(torch.randn(rank, dim, generator=g, device=device) * dim ** -0.5).to(dtype) for _ in range(L)]
        self.w2 = [(torch.randn(n_ff, rank, generator=g, device=device) * rank ** -0.5).to(dtype) for _ in range(L)]
        self.logits = torch.zeros(L, n_ff, device=device, dtype=torch.float32)
        self.hidden = torch.zeros(L, rank, device=device, dtype=torch.float32)
        self.act = torch.zeros(L, n_ff, device=device, dtype=torch.bool)
        self.bank_rows = bank_rows
        self.dtype = dtype

    def set_probabilities(self, probs: np.ndarray) -> None:
        self.p.copy_(torch.as_tensor(probs, dtype=torch.float32))

    def _decide(self, eng, l: int, x: torch.Tensor) -> None:
        # the predictor's cost, paid in full; its output is kept (self.logits) but not used (see above)
        self.logits[l].copy_(F.linear(F.relu(F.linear(x.to(self.dtype), self.w1[l])), self.w2[l]).float())
        row = torch.remainder(eng.pos, self.bank_rows)
        u = self.bank[l].index_select(0, row)[0]
        self.act[l].copy_(u < self.p[l])

    def cold_mask(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        self._decide(eng, l, x)
        return self.act[l].index_select(0, eng.cold_ids_dev[l]).to(torch.uint8)

    def fill_cold_mask(self, eng, l: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """cold_mask written into `out` (uint8 [C]); with the engine's Triton kernels: two gemvs and one
        sampling kernel that reads the decisions of the cold slots only (same decisions as cold_mask)."""
        ops = getattr(eng, "ops", None)
        if ops is None:
            out.copy_(self.cold_mask(eng, l, x))
            return
        ops.gemv(self.w1[l], self.hidden[l], x=x, relu=True)
        ops.gemv(self.w2[l], self.logits[l], x=self.hidden[l])
        ops.sample_mask(self.bank[l], eng.pos, self.p[l], eng.cold_ids_dev[l], out)

    def hot_active(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        """The decisions for the hot slots (the same draws as cold_mask's, so both sides agree)."""
        row = torch.remainder(eng.pos, self.bank_rows)
        u = self.bank[l].index_select(0, row)[0]
        ids = eng.hot_ids_dev[l]
        return (u.index_select(0, ids) < self.p[l].index_select(0, ids)).float()

    def bytes_per_token(self) -> int:
        es = self.w1[0].element_size()
        return sum((a.numel() + b.numel()) * es for a, b in zip(self.w1, self.w2)) + self.p.numel() * 8


class OracleSelector:
    def __init__(self, gate_weights: list[torch.Tensor], thresholds: list[float], device):
        """gate_weights[l]: the layer's full W_gate [n_ff, D] (id order); thresholds: t_l of |silu(g)|."""
        self.w = [w.to(device) for w in gate_weights]
        self.t = torch.tensor(thresholds, dtype=torch.float32, device=device)
        self.act = [torch.zeros(w.shape[0], dtype=torch.bool, device=device) for w in gate_weights]

    def cold_mask(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(F.linear(x.to(self.w[l].dtype), self.w[l]).float())
        self.act[l].copy_(s.abs() > self.t[l])
        return self.act[l].index_select(0, eng.cold_ids_dev[l]).to(torch.uint8)

    def hot_active(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        return self.act[l].index_select(0, eng.hot_ids_dev[l]).float()
