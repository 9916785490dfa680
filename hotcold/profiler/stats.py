"""Summary statistics of a Profile (what `hotcold profile show` prints) and the frequency-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hotcold.errors import InputError
from hotcold.profiler.artifact import Profile

PHASES = ("decode", "prefill", "all")


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when every neuron fires equally, -> 1 when one does all."""
    x = np.sort(np.asarray(counts, dtype=np.float64).reshape(-1))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def neurons_covering(counts: np.ndarray, share: float = 0.8) -> int:
    """The fewest neurons whose activations add up to `share` of the layer's activations (0 if none)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = c.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(c), share * total * (1 - 1e-12), side="left") + 1)


def phase_counts(profile: Profile, phase: str) -> tuple[np.ndarray, int | None]:
    """(counts [L, F], tokens or None when unknown) of a phase; "decode" falls back to "all" when empty."""
    if phase not in PHASES:
        raise InputError(f"unknown phase {phase!r}", f"use one of: {', '.join(PHASES)}")
    tc = profile.token_count
    if phase == "decode" and not tc.get("decode"):
        phase = "all"
    if phase == "decode":
        return profile.active_count_decode, tc.get("decode")
    if phase == "prefill":
        return profile.active_count_prefill, tc.get("prefill")
    n = None if tc.get("prefill") is None or tc.get("decode") is None else tc["prefill"] + tc["decode"]
    return profile.active_count, n


def layer_summary(profile: Profile, phase: str = "decode", share: float = 0.8) -> list[dict[str, Any]]:
    """Per layer: mean active fraction and sparsity (None when the token count is unknown), neurons
    covering `share` of activations (count and fraction of n_ff), Gini, and the largest frequency."""
    counts, tokens = phase_counts(profile, phase)
    n_ff = counts.shape[1]
    rows = []
    for layer, c in enumerate(counts):
        active = float(c.sum()) / (tokens * n_ff) if tokens else None
        k = neurons_covering(c, share)
        rows.append({"layer": layer, "active": active, "sparsity": None if active is None else 1.0 - active,
                     "cover_neurons": k, "cover_fraction": k / n_ff, "gini": gini(c),
                     "max_frequency": float(c.max()) / tokens if tokens else None})
    return rows


def summary(profile: Profile, phase: str = "decode", share: float = 0.8) -> dict[str, Any]:
    """Everything `profile show --json` prints."""
    m = profile.manifest
    rows = layer_summary(profile, phase, share)
    act = [r["active"] for r in rows if r["active"] is not None]
    counts, tokens = phase_counts(profile, phase)
    return {
        "path": str(profile.path) if profile.path else None,
        "model": {"source": m["model"].get("source"), "fingerprint": m["model"]["fingerprint"],
                  "n_layers": profile.n_layers, "n_ff": profile.n_ff},
        "dataset": {k: v for k, v in (m.get("dataset") or {}).items() if k != "ids"},
        "mode": m.get("mode"),
        "activation": m.get("activation"),
        "token_count": m.get("token_count"),
        "phase": phase if not (phase == "decode" and not profile.token_count.get("decode")) else "all",
        "share": share,
        "mean_sparsity": None if not act else 1.0 - float(np.mean(act)),
        "cover_fraction": neurons_covering(counts.reshape(-1), share) / counts.size,
        "samples": int(len(profile.samples.get("phase", []))) if profile.samples else (m.get("samples") or {}).get("n", 0),
        "layers": rows,
    }


def plot_frequencies(profile: Profile, path: str | Path, phase: str = "decode") -> Path:
    """Sorted neuron frequency per layer (rank as a fraction of n_ff, log scale), coloured by depth,
    and the per-layer share of neurons covering 80% of activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, tokens = phase_counts(profile, phase)
    L, Fn = counts.shape
    norm = float(tokens) if tokens else float(max(counts.max(), 1))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("viridis")
    x = (np.arange(Fn) + 1) / Fn
    for layer in range(L):
        ax.plot(x, np.sort(counts[layer])[::-1] / norm, color=cmap(layer / max(L - 1, 1)), lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("neuron rank / n_ff (most active first)")
    ax.set_ylabel("activation frequency" + ("" if tokens else " (normalised by max; token count unknown)"))
    ax.set_title(f"per-layer frequency curves ({phase})")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, L - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    rows = layer_summary(profile, phase)
    ax2.bar([r["layer"] for r in rows], [r["cover_fraction"] for r in rows], color="tab:orange")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("fraction of neurons covering 80% of activations")
    ax2.set_ylim(0, 1)
    fig.suptitle(str(profile.manifest["model"].get("source", "")), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
