"""The benchmark model's activation statistics: real profiles mapped onto a larger shape.

A 70B-shaped random-weight model has no activation statistics of its own, so the benchmark borrows a
real model's: each of the target's N layers takes the profile of the source layer at the same relative
depth (round(l / (N-1) · (L_src - 1))), and each target neuron j copies the frequency of source neuron
σ_l(j) mod n_src (σ_l a fixed random permutation per layer), times a log-normal jitter
(σ = `jitter`) so that ties break. Several profiles of the same source model (e.g. MBPP prompts and
prose prompts) are mapped with the *same* σ and jitter, so a neuron keeps its identity across
workloads and a workload shift is a real one.

`density_power` finds γ such that the mean of f^γ over the cold neurons of a placement equals a target
cold density (γ is monotone, so it never changes which neurons are hottest); it is applied to every
workload alike and reported.

Without a profile, `synthetic` gives power-law frequencies (hotcold.profiler.synth), labelled as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _kind_of(activation):
    from hotcold.profiler.activation import kind_of

    return kind_of(activation)


def load_frequencies(path: str | Path, phase: str = "decode") -> tuple[np.ndarray, dict]:
    from hotcold.profiler.artifact import Profile

    p = Profile.load(path)
    f = p.frequencies(phase)
    info = {"path": str(path), "model": p.manifest["model"].get("source"), "dataset": p.manifest.get("dataset"),
            "token_count": p.token_count, "activation": _kind_of(p.manifest.get("activation")),
            "content_hash": p.content_hash, "phase": phase}
    return np.asarray(f, dtype=np.float64), info


def depth_index(n_layers: int, n_src: int) -> list[int]:
    """For each of n_layers target layers, the source layer (of n_src) at the same relative depth."""
    return [int(round(l / max(n_layers - 1, 1) * (n_src - 1))) for l in range(n_layers)]


class DepthMap:
    """The map of `map_by_depth` as an object: `apply` maps any [L_src, n_src] array of the source model
    (a profile, one sequence's prefill, one block of its continuation) the same way, so per-sequence
    records of the source land on the same target neurons as its profiles."""

    def __init__(self, L_src: int, n_src: int, n_layers: int, n_ff: int, seed: int = 0, jitter: float = 0.25):
        rng = np.random.default_rng(seed)
        self.shape_src = (L_src, n_src)
        self.src_layer = depth_index(n_layers, L_src)
        self.idx = np.stack([rng.permutation(n_ff) % n_src for _ in range(n_layers)])
        self.noise = np.exp(jitter * rng.standard_normal((n_layers, n_ff)))

    def apply(self, f: np.ndarray) -> np.ndarray:
        if tuple(f.shape) != self.shape_src:
            raise ValueError(f"expected a source array of shape {self.shape_src}, got {tuple(f.shape)}")
        g = np.take_along_axis(np.asarray(f, dtype=np.float64)[self.src_layer], self.idx, axis=1) * self.noise
        return np.clip(g, 0.0, 1.0)


def map_by_depth(sources: Sequence[np.ndarray], n_layers: int, n_ff: int, seed: int = 0,
                 jitter: float = 0.25) -> list[np.ndarray]:
    """Each source [L_src, n_src] -> [n_layers, n_ff] with one shared neuron map and jitter."""
    m = DepthMap(*sources[0].shape, n_layers, n_ff, seed=seed, jitter=jitter)
    return [m.apply(f) for f in sources]


def smallest(v: np.ndarray, m: int) -> np.ndarray:
    """The indices of the m smallest values of v, smallest first, ties by index: np.argsort(v,
    kind="stable")[:m] in O(n) (one partition and a sort of m) — the decision runs every block, per layer."""
    n = len(v)
    if m >= n:
        return np.argsort(v, kind="stable")
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    thr = np.partition(v, m - 1)[m - 1]
    lt = np.flatnonzero(v < thr)
    idx = np.concatenate([lt, np.flatnonzero(v == thr)[: m - len(lt)]])
    return idx[np.lexsort((idx, v[idx]))]


def global_top_k_mask(f: np.ndarray, k: int) -> np.ndarray:
    """The k most frequent neurons over all layers (PowerInfer's fixed policy at a budget)."""
    flat = f.ravel()
    mask = np.zeros(flat.shape, dtype=bool)
    if k > 0:
        mask[np.argpartition(-flat, min(k, flat.size) - 1)[:k]] = True
    return mask.reshape(f.shape)


def density_power(f: np.ndarray, cold: np.ndarray, target: float) -> float:
    """γ with mean(f[cold]^γ) = target (bisection on log γ)."""
    fc = np.clip(f[cold], 1e-12, 1.0)
    lo, hi = np.log(1e-3), np.log(1e3)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.mean(fc ** np.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def synthetic(n_layers: int, n_ff: int, seed: int = 0) -> np.ndarray:
    from hotcold.profiler.synth import power_law_frequencies

    rng = np.random.default_rng(seed)
    skew = np.linspace(0.6, 1.2, n_layers)
    dens = np.linspace(0.2, 0.1, n_layers)
    f = power_law_frequencies(n_ff, skew, dens)
    return np.take_along_axis(f, np.argsort(rng.random((n_layers, n_ff)), axis=1), axis=1)


def shifted(f: np.ndarray, fraction: float = 0.3, seed: int = 1) -> np.ndarray:
    """A synthetic workload shift: in each layer a random `fraction` of the neurons trade frequencies."""
    rng = np.random.default_rng(seed)
    g = f.copy()
    L, n = f.shape
    for l in range(L):
        idx = rng.choice(n, int(fraction * n), replace=False)
        g[l, idx] = f[l, rng.permutation(idx)]
    return g
