"""Synthetic profiles for what-if planning and solver benchmarks (e.g. LLaMA-70B's 80 x 28672 shape).

How a synthetic profile is generated (everything seeded by `seed`):

1. Per layer l a skew s_l >= 0 and a density d_l in (0, 1] (the mean fraction of neurons active per
   token). Neuron frequencies follow a power law over their rank, as PowerInfer observed for real
   models: f_r = min(1, c_l * r^(-s_l)) for rank r = 1..n_ff, with c_l found by bisection so that
   mean_r f_r = d_l. s = 0 is uniform (every neuron active with probability d); larger s concentrates
   the activations on fewer hot neurons.
2. Each layer's neurons are randomly permuted, so the hot ones are not simply the first indices (a
   consumer must sort by frequency, as it must for a real profile).
3. Counts are drawn, not rounded: prefill ~ Binomial(prefill_tokens, f_i), decode ~ Binomial(decode_tokens,
   f_i), independently (the same frequencies for both phases).
4. |a| histograms are the expected bin counts of a log-normal magnitude, log10|a| ~ Normal(mu_l, SIGMA),
   with mu_l placed so that P(|a| > MAG_THRESHOLD) = d_l; the manifest records t_l = MAG_THRESHOLD as a
   magnitude activation threshold, so thresholds derived from the histograms are consistent with the
   counts (profile.magnitude_threshold(l, 1 - d_l) is about MAG_THRESHOLD).

The manifest says "synthetic" (dataset kind, mode) and records every parameter. By default the model
fingerprint is that of `random:<shape>:seed=0` (hotcold.model.random), so a synthetic profile matches
the random-weight model of the same shape through solve and export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource
from hotcold.profiler.activation import HISTOGRAM, manifest_entry
from hotcold.profiler.artifact import Profile, hist_edges

MAG_THRESHOLD = 0.05  # |a| units of the synthetic magnitudes: any positive value would do
SIGMA = 0.75  # decades: spread of log10|a| within a layer
DEFAULT_SKEW = 1.0
DEFAULT_DENSITY = 0.1


def per_layer(value: float | Sequence[float] | str, n_layers: int, name: str) -> list[float]:
    """A per-layer parameter from a number, a list of n_layers numbers, or a string: "0.8" (every layer),
    "0.6:1.2" (linear from the first layer to the last) or "a,b,c,..." (one per layer)."""
    if isinstance(value, str):
        s = value.strip()
        try:
            if ":" in s:
                a, b = (float(v) for v in s.split(":"))
                return list(np.linspace(a, b, n_layers)) if n_layers > 1 else [a]
            if "," in s:
                value = [float(v) for v in s.split(",")]
            else:
                value = float(s)
        except ValueError:
            raise InputError(f"--{name} {value!r} is not a number, A:B or a comma list",
                             f"pass e.g. --{name} 1.0 or --{name} 0.6:1.2") from None
    if isinstance(value, (int, float)):
        return [float(value)] * n_layers
    vals = [float(v) for v in value]
    if len(vals) != n_layers:
        raise InputError(f"--{name} has {len(vals)} values for {n_layers} layers",
                         f"give one value, A:B, or exactly {n_layers} values")
    return vals


def power_law_frequencies(n_ff: int, skew: np.ndarray, density: np.ndarray) -> np.ndarray:
    """[L, n_ff] frequencies in rank order: f_r = min(1, c_l r^-s_l) with mean d_l, solved exactly.

    With the k highest ranks clipped at 1: c = (d n_ff - k) / sum_{r>k} w_r; the answer is the k for which
    c w_k >= 1 >= c w_{k+1} (O(L n_ff), no iteration).
    """
    L = len(skew)
    ranks = np.arange(1, n_ff + 1, dtype=np.float64)
    w = np.exp(-skew[:, None] * np.log(ranks)[None, :])  # [L, F], decreasing in rank
    suffix = np.cumsum(w[:, ::-1], axis=1)[:, ::-1]  # suffix[:, k] = sum of w[:, k:]  (k = clipped count)
    k = np.arange(n_ff)[None, :]
    c = (density[:, None] * n_ff - k) / suffix  # [L, F]: c if exactly k ranks are clipped
    above = np.ones_like(c, dtype=bool)  # c w_k >= 1 for the k-th clipped rank (none when k = 0)
    above[:, 1:] = c[:, 1:] * w[:, :-1] >= 1.0
    valid = (c > 0) & above & (c * w <= 1.0)
    first = np.where(valid.any(1), valid.argmax(1), n_ff - 1)
    cc = c[np.arange(L), first]
    f = np.minimum(1.0, cc[:, None] * w)
    f[density >= 1.0] = 1.0
    return f


def synth_profile(cfg: ModelConfig, skew: float | Sequence[float] | str = DEFAULT_SKEW, seed: int = 0, *,
                  density: float | Sequence[float] | str = DEFAULT_DENSITY, prefill_tokens: int = 50_000,
                  decode_tokens: int = 50_000, source: WeightSource | None = None) -> Profile:
    """A synthetic Profile of shape [cfg.n_layers, cfg.n_ff] (see the module docstring for the method).

    skew / density: one value, "A:B" (linear over layers) or one per layer. source: the model whose
    fingerprint the profile carries (default: the random-weight model of this shape, seed 0).
    """
    L, Fn = cfg.n_layers, cfg.n_ff
    s = np.asarray(per_layer(skew, L, "skew"))
    d = np.asarray(per_layer(density, L, "density"))
    if (s < 0).any() or not np.isfinite(s).all():
        raise InputError("--skew must be >= 0 for every layer", "pass e.g. --skew 1.0 (0 is uniform)")
    if (d <= 0).any() or (d > 1).any():
        raise InputError("--density must be in (0, 1] for every layer", "pass e.g. --density 0.1")
    if prefill_tokens < 0 or decode_tokens < 0 or prefill_tokens + decode_tokens == 0:
        raise InputError("synthetic token counts must be >= 0 and not both 0", "pass e.g. --tokens 100000")
    rng = np.random.default_rng(seed)
    f = power_law_frequencies(Fn, s, d)
    perm = np.argsort(rng.random((L, Fn)), axis=1)  # a random permutation per layer
    f = np.take_along_axis(f, perm, axis=1)
    prefill = rng.binomial(prefill_tokens, f).astype(np.int64)
    decode = rng.binomial(decode_tokens, f).astype(np.int64)
    return profile_from_counts(
        cfg, prefill, decode, d, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, source=source,
        synthetic={"method": "power law over rank, f_r = min(1, c r^-skew), mean = density; "
                             "random permutation; binomial counts; log-normal |a| histograms",
                   "skew": [float(v) for v in s], "density": [float(v) for v in d], "seed": seed})


def profile_from_counts(cfg: ModelConfig, prefill: np.ndarray, decode: np.ndarray, density: np.ndarray, *,
                        prefill_tokens: int, decode_tokens: int, synthetic: dict,
                        source: WeightSource | None = None) -> Profile:
    """A synthetic Profile around drawn counts [L, n_ff]: the |a| histograms of step 4 for per-layer
    densities d_l, and the manifest (`synthetic` describes how the counts were made). Shared by
    `synth_profile` and hotcold.solver.synth, whose frequencies follow another distribution."""
    L, Fn = cfg.n_layers, cfg.n_ff
    d = np.asarray(density, dtype=np.float64)
    if prefill.shape != (L, Fn) or decode.shape != (L, Fn) or d.shape != (L,):
        raise InputError(f"synthetic counts must have shape {L}x{Fn} with {L} densities",
                         "build them for this model's shape")
    edges = np.log10(hist_edges(**HISTOGRAM))
    nd = NormalDist()
    hist_p = np.zeros((L, HISTOGRAM["bins"] + 2), np.int64)
    hist_d = np.zeros_like(hist_p)
    cdf = np.vectorize(nd.cdf)
    for layer in range(L):
        z = nd.inv_cdf(min(max(1.0 - d[layer], 1e-12), 1 - 1e-12))
        mu = math.log10(MAG_THRESHOLD) - SIGMA * z
        c = cdf((edges - mu) / SIGMA)  # P(log10|a| < edge)
        probs = np.concatenate([[c[0]], np.diff(c), [1.0 - c[-1]]])
        hist_p[layer] = np.rint(probs * prefill_tokens * Fn).astype(np.int64)
        hist_d[layer] = np.rint(probs * decode_tokens * Fn).astype(np.int64)

    if source is None:
        from hotcold.model.random import RandomSource

        source = RandomSource(cfg, seed=0)
    if source.config.shape_key() != cfg.shape_key():
        raise InputError("the model given to synth has another shape than the synthetic profile",
                         "pass --shape or --model, not both")
    manifest = {
        "model": source.manifest_entry(),
        "dataset": {"name": "synthetic", "kind": "synthetic", "n_prompts": 0},
        "mode": "synthetic",
        "activation": manifest_entry("product", [MAG_THRESHOLD] * L, None),
        "calibration": None,
        "token_count": {"prefill": int(prefill_tokens), "decode": int(decode_tokens)},
        "histogram": dict(HISTOGRAM),
        "samples": None,
        "synthetic": {**synthetic, "magnitude_threshold": MAG_THRESHOLD, "sigma_decades": SIGMA},
    }
    return Profile(manifest=manifest, active_count_prefill=prefill, active_count_decode=decode,
                   hist_prefill=hist_p, hist_decode=hist_d)
