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


def map_by_depth(sources: Sequence[np.ndarray], n_layers: int, n_ff: int, seed: int = 0,
                 jitter: float = 0.25) -> list[np.ndarray]:
    """Each source [L_src, n_src] -> [n_layers, n_ff] with one shared neuron map and jitter."""
    L_src, n_src = sources[0].shape
    rng = np.random.default_rng(seed)
    src_layer = depth_index(n_layers, L_src)
    idx = np.stack([rng.permutation(n_ff) % n_src for _ in range(n_layers)])
    noise = np.exp(jitter * rng.standard_normal((n_layers, n_ff)))
    out = []
    for f in sources:
        g = np.take_along_axis(f[src_layer], idx, axis=1) * noise
        out.append(np.clip(g, 0.0, 1.0))
    return out


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
