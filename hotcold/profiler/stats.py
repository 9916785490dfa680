"""Summary statistics of a Profile (what `hotcold profile show` prints) and the frequency-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hotcold.errors import InputError
from hotcold.profiler.artifact import Profile

PHASES = ("decode", "prefill", "all")
COVERAGE_AT = (0.05, 0.1, 0.2, 0.3, 0.5)  # neuron fractions of the coverage curve
STABILITY_AT = 0.2  # neuron fraction the stability figures use


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


def coverage(counts: np.ndarray, fractions: tuple[float, ...] = COVERAGE_AT) -> list[float]:
    """The coverage curve of one layer: share of its activations caught by its top x of neurons, per x."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = c.sum()
    cum = np.concatenate([[0.0], np.cumsum(c)])
    return [float(cum[int(round(x * len(c)))] / total) if total else 0.0 for x in fractions]


def caught_by(reference: np.ndarray, target: np.ndarray, fraction: float = STABILITY_AT) -> np.ndarray:
    """Per layer: share of `target`'s activations [L, F] caught by `reference`'s top `fraction` of neurons
    (ties by neuron id), over the share `target`'s own top set catches — 1.0 when the reference's top set
    is as good as the target's own."""
    k = int(round(fraction * reference.shape[1]))
    ref_top = np.argsort(-np.asarray(reference, np.float64), axis=1, kind="stable")[:, :k]
    got = np.take_along_axis(np.asarray(target, np.float64), ref_top, axis=1).sum(1)
    best = -np.sort(-np.asarray(target, np.float64), axis=1)[:, :k].sum(1)
    return np.where(best > 0, got / np.maximum(best, 1e-300), 1.0)


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two count vectors (average ranks for ties)."""
    from scipy.stats import spearmanr

    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def sequence_counts(profile: Profile, phase: str) -> np.ndarray | None:
    """[S, L, F] per-sequence counts of a phase (None without loaded per-sequence records)."""
    from hotcold.profiler.persequence import decode_counts

    sq = profile.sequences
    if not sq:
        return None
    if phase == "decode" and not profile.token_count.get("decode"):
        phase = "all"
    if phase == "prefill":
        return sq["prefill"].astype(np.int32)
    dec = decode_counts(sq)
    return dec if phase == "decode" else dec + sq["prefill"].astype(np.int32)


def stability(profile: Profile, phase: str = "decode", other: Profile | None = None,
              fraction: float = STABILITY_AT) -> dict[str, Any]:
    """How stable the top `fraction` of neurons is. halves (needs per-sequence records): the sequences
    split into even and odd positions, each half's top set scored on the other half (relative to that
    half's own top set, `caught_by`, averaged over both directions), and the rank correlation of the two
    halves' counts; against (with `other`, a profile of another workload): `other`'s activations caught
    by this profile's top set, relative to its own."""
    out: dict[str, Any] = {"fraction": fraction, "halves": None, "against": None}
    per = sequence_counts(profile, phase)
    if per is not None and per.shape[0] >= 2:
        a, b = per[0::2].sum(0), per[1::2].sum(0)
        rel = 0.5 * (caught_by(a, b, fraction) + caught_by(b, a, fraction))
        out["halves"] = {"sequences": [int(per[0::2].shape[0]), int(per[1::2].shape[0])],
                         "relative_catch": [float(v) for v in rel],
                         "rank_correlation": [_rank_corr(a[l], b[l]) for l in range(a.shape[0])],
                         "relative_catch_mean": float(rel.mean())}
    if other is not None:
        if other.fingerprint != profile.fingerprint:
            raise InputError(f"--against {other.path} is a profile of another model",
                             "compare profiles of the same model")
        mine, theirs = phase_counts(profile, phase)[0], phase_counts(other, phase)[0]
        rel = caught_by(mine, theirs, fraction)
        k = int(round(fraction * mine.shape[1]))
        top = np.argsort(-mine.astype(np.float64), axis=1, kind="stable")[:, :k]
        absolute = np.take_along_axis(theirs.astype(np.float64), top, axis=1).sum() / max(theirs.sum(), 1)
        out["against"] = {"path": str(other.path) if other.path else None,
                          "dataset": {k2: v for k2, v in (other.manifest.get("dataset") or {}).items() if k2 != "ids"},
                          "relative_catch": [float(v) for v in rel], "relative_catch_mean": float(rel.mean()),
                          "catch": float(absolute),
                          "rank_correlation": [_rank_corr(mine[l], theirs[l]) for l in range(mine.shape[0])]}
    return out


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
                     "coverage": dict(zip((str(x) for x in COVERAGE_AT), coverage(c))),
                     "max_frequency": float(c.max()) / tokens if tokens else None,
                     "min_frequency": float(c.min()) / tokens if tokens else None})
    return rows


def summary(profile: Profile, phase: str = "decode", share: float = 0.8, against: Profile | None = None) -> dict[str, Any]:
    """Everything `profile show --json` prints."""
    m = profile.manifest
    rows = layer_summary(profile, phase, share)
    act = [r["active"] for r in rows if r["active"] is not None]
    counts, tokens = phase_counts(profile, phase)
    per_layer_top = np.sort(counts.astype(np.float64), axis=1)[:, ::-1].cumsum(1)
    total = float(counts.sum())
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
        # every layer's own top x of neurons, activations summed over layers
        "coverage": {str(x): (float(per_layer_top[:, max(int(round(x * counts.shape[1])), 1) - 1].sum()) / total
                              if total else 0.0) for x in COVERAGE_AT},
        "gini_range": [min(r["gini"] for r in rows), max(r["gini"] for r in rows)],
        "stability": stability(profile, phase, against),
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
