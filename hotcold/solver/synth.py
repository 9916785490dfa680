"""Synthetic activation profiles, to build, test and benchmark the solver at any model shape.

Each layer's neuron frequencies are drawn from a log-normal distribution (a few hot neurons, a long cold
tail, as profiles of ReLU and thresholded SwiGLU models show), with a mean firing rate and a skew that
drift with depth and differ from layer to layer, then sampled as counts over `tokens` decode tokens.
These are not statistics of any real model and every artifact made from them says so.
"""

from __future__ import annotations

import numpy as np

from hotcold.artifacts import sha256_json
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
    """A Profile of `cfg`'s shape whose decode counts are synthetic (see the module docstring)."""
    from hotcold.profiler.artifact import HIST_BINS, HIST_HI, HIST_LO, Profile

    counts = synthetic_counts(cfg.n_layers, cfg.n_ff, tokens, seed)
    zeros = np.zeros_like(counts)
    hist = np.zeros((cfg.n_layers, HIST_BINS + 2), dtype=np.int64)
    manifest = {
        "kind": "profile", "format_version": 1,
        "model": {"fingerprint": "synthetic-" + sha256_json(cfg.shape_key())[:16], "config": cfg.to_json(),
                  "source": f"synthetic shape {cfg.name} (random, no weights)"},
        "dataset": {"name": "synthetic", "seed": seed, "n_prompts": 0,
                    "distribution": "per-layer log-normal frequencies (hotcold.solver.synth)"},
        "mode": "synthetic",
        "activation": {"kind": "synthetic", "thresholds": None, "target_sparsity": None},
        "token_count": {"prefill": 0, "decode": int(tokens)},
        "histogram": {"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS},
    }
    return Profile(manifest=manifest, active_count_prefill=zeros, active_count_decode=counts,
                   hist_prefill=hist, hist_decode=hist.copy())
