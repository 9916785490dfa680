"""Synthetic activation profiles, to build, test and benchmark the solver at any model shape.

Each layer's neuron frequencies are drawn from a log-normal distribution (a few hot neurons, a long cold
tail, as profiles of ReLU and thresholded SwiGLU models show), with a mean firing rate and a skew that
drift with depth and differ from layer to layer, then sampled as counts over `tokens` decode tokens.
These are not statistics of any real model and every artifact made from them says so.
"""

from __future__ import annotations

import numpy as np

from hotcold.model.config import ModelConfig


def synthetic_frequencies(n_layers: int, n_ff: int, seed: int = 0, mean_range: tuple[float, float] = (0.04, 0.30),
                          sigma_range: tuple[float, float] = (0.8, 2.0)) -> np.ndarray:
    """[n_layers, n_ff] activation probabilities in [0, 1], skewed within a layer, varied across layers."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(0.0, 1.0, n_layers)
    # mean firing rate: low in early layers, highest two thirds of the way down, with per-layer noise
    shape = np.exp(-((depth - 0.65) ** 2) / 0.08)
    mean = mean_range[0] + (mean_range[1] - mean_range[0]) * shape * rng.uniform(0.6, 1.0, n_layers)
    sigma = rng.uniform(*sigma_range, n_layers)
    mu = np.log(mean) - sigma**2 / 2
    f = np.exp(mu[:, None] + sigma[:, None] * rng.standard_normal((n_layers, n_ff)))
    return np.clip(f, 0.0, 1.0)


def synthetic_counts(n_layers: int, n_ff: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Active counts over `tokens` tokens, [n_layers, n_ff] int64."""
    p = synthetic_frequencies(n_layers, n_ff, seed)
    return np.random.default_rng(seed + 1).binomial(tokens, p).astype(np.int64)


def synthetic_profile(cfg: ModelConfig, seed: int = 0, tokens: int = 65536):
    """A Profile of `cfg`'s shape whose decode counts are synthetic (see the module docstring).

    The counts are this module's; histograms, manifest and fingerprint (that of the random-weight model of
    this shape) come from the profiler's synthetic profiles (hotcold.profiler.synth), as `hotcold profile
    synth` writes them. Prefill is not modelled (0 tokens)."""
    from hotcold.profiler.synth import profile_from_counts

    counts = synthetic_counts(cfg.n_layers, cfg.n_ff, tokens, seed)
    return profile_from_counts(
        cfg, np.zeros_like(counts), counts, counts.mean(axis=1) / max(tokens, 1), prefill_tokens=0,
        decode_tokens=tokens,
        synthetic={"method": "per-layer log-normal frequencies drifting with depth (hotcold.solver.synth); "
                             "binomial decode counts; log-normal |a| histograms", "seed": seed})
