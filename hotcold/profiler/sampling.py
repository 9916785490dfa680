"""Sampled (FFN input x, active mask) pairs for predictor training (format: artifact.py, samples.safetensors).

Each profiled token position gets a pseudo-random key from (seed, prompt id, position); the `k`
positions with the smallest keys are kept ("bottom-k"). The kept set therefore does not depend on the
order in which prompts are run, on batching, or on how prompts are sharded over ranks: each rank keeps
its own bottom-k and the union's bottom-k is the global one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def position_keys(seed: int, seq_id: str, n: int) -> np.ndarray:
    """Keys in [0, 1) for positions 0..n-1 of sequence `seq_id` (splitmix64 of a per-sequence base)."""
    base = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}:{seq_id}".encode()).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        z = base + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class SampleSet:
    """Kept samples, sorted by key: keys [n] float64, x [n, L, D] float16, mask [n, L, F] bool, phase [n] uint8."""

    keys: np.ndarray
    x: np.ndarray
    mask: np.ndarray
    phase: np.ndarray

    @classmethod
    def empty(cls, n_layers: int, dim: int, n_ff: int) -> SampleSet:
        return cls(np.zeros(0, np.float64), np.zeros((0, n_layers, dim), np.float16),
                   np.zeros((0, n_layers, n_ff), bool), np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.keys)

    def bottom(self, k: int) -> SampleSet:
        order = np.argsort(self.keys, kind="stable")[:k]
        return SampleSet(self.keys[order], self.x[order], self.mask[order], self.phase[order])

    @classmethod
    def concat(cls, parts: Sequence[SampleSet]) -> SampleSet:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("keys", "x", "mask", "phase")))

    def artifact(self) -> dict[str, np.ndarray]:
        """The tensors Profile.samples holds (keys are the sampler's business, not the artifact's)."""
        return {"x": self.x, "mask": self.mask, "phase": self.phase}


class Window:
    """The sample positions of one forward unit (a generated prompt, or a teacher-forced batch).

    Rows are numbered as the unit's flattened [B*T] token positions; `capture` is called with any
    contiguous range of them, per layer, and stores the rows it holds.
    """

    def __init__(self, rows: list[int], keys: list[float], phase: list[int], n_layers: int, dim: int, n_ff: int,
                 device: torch.device):
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)
        self.keys = np.asarray(keys, np.float64)
        self.phase = np.asarray(phase, np.uint8)
        m = len(rows)
        self.x = torch.zeros((m, n_layers, dim), dtype=torch.float16, device=device)
        self.mask = torch.zeros((m, n_layers, n_ff), dtype=torch.bool, device=device)
        self.filled = torch.zeros(m, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return len(self.keys)

    def capture(self, layer: int, x2d: torch.Tensor, active_fn, a2d: torch.Tensor, base: int) -> None:
        """Rows base..base+len(a2d)-1 of the unit, for `layer`: store x and the active mask of kept rows."""
        if not len(self):
            return
        sel = ((self.rows >= base) & (self.rows < base + a2d.shape[0])).nonzero().squeeze(1)
        if not sel.numel():
            return
        idx = self.rows[sel] - base
        xs = x2d[idx]
        self.x[sel, layer] = xs.to(torch.float16)
        self.mask[sel, layer] = active_fn(layer, xs, a2d[idx])
        if layer == 0:
            self.filled[sel] = True

    def result(self) -> SampleSet:
        ok = self.filled.cpu().numpy()
        return SampleSet(self.keys[ok], self.x.cpu().numpy()[ok], self.mask.cpu().numpy()[ok], self.phase[ok])


class Sampler:
    """Bottom-k sampling of token positions over a whole run (one rank's share)."""

    def __init__(self, k: int, seed: int, n_layers: int, dim: int, n_ff: int, device: torch.device):
        self.k, self.seed = k, seed
        self.shape = (n_layers, dim, n_ff)
        self.device = device
        self.kept = SampleSet.empty(*self.shape)
        self.preselected: dict[str, np.ndarray] | None = None  # seq id -> positions (teacher-forced)

    @property
    def enabled(self) -> bool:
        return self.k > 0

    def preselect(self, seqs: Sequence[tuple[str, int]]) -> None:
        """Teacher-forced runs know every position up front: choose the bottom-k now. seqs: (id, length)."""
        if not self.enabled:
            return
        ids, pos, keys = [], [], []
        for i, (sid, n) in enumerate(seqs):
            kk = position_keys(self.seed, sid, n)
            ids.append(np.full(n, i))
            pos.append(np.arange(n))
            keys.append(kk)
        if not keys:
            self.preselected = {}
            return
        ids_a, pos_a, keys_a = np.concatenate(ids), np.concatenate(pos), np.concatenate(keys)
        order = np.argsort(keys_a, kind="stable")[:self.k]
        chosen: dict[str, list[int]] = {}
        for j in order:
            chosen.setdefault(seqs[int(ids_a[j])][0], []).append(int(pos_a[j]))
        self.preselected = {sid: np.sort(np.asarray(p)) for sid, p in chosen.items()}

    def window(self, entries: Sequence[tuple[str, int, int, int]]) -> Window | None:
        """entries: (seq id, prompt length, positions that may be profiled, row base) per sequence."""
        if not self.enabled:
            return None
        rows, keys, phase = [], [], []
        limit = self.kept.keys[self.k - 1] if len(self.kept) >= self.k else np.inf
        for sid, plen, n, base in entries:
            kk = position_keys(self.seed, sid, n)
            if self.preselected is not None:
                pos = self.preselected.get(sid, np.zeros(0, np.int64))
            else:
                pos = np.nonzero(kk < limit)[0]
                pos = pos[np.argsort(kk[pos], kind="stable")[:self.k]]
            for p in pos:
                rows.append(base + int(p))
                keys.append(float(kk[p]))
                phase.append(0 if p < plen else 1)
        return Window(rows, keys, phase, *self.shape, self.device)

    def absorb(self, window: Window | None) -> None:
        if window is not None and len(window):
            self.kept = SampleSet.concat([self.kept, window.result()]).bottom(self.k)

    # ---- checkpoint state -----------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {"sample_keys": self.kept.keys, "sample_x": self.kept.x, "sample_mask": self.kept.mask,
                "sample_phase": self.kept.phase}

    def load_state(self, t: dict[str, np.ndarray]) -> None:
        if "sample_keys" in t:
            self.kept = SampleSet(t["sample_keys"], t["sample_x"], t["sample_mask"], t["sample_phase"])
