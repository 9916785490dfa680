"""The Profile artifact (design.md §2): per-layer, per-neuron activation counts and magnitude histograms.

Directory layout (format version 1):
    manifest.json        kind "profile", format_version, model {fingerprint, config, source},
                         dataset {...}, mode, activation {kind, thresholds, target_sparsity},
                         token_count {prefill, decode}, histogram {lo, hi, bins}, files [...]
                         and, as the producer knows them: calibration {prompts, ids, phase, ...},
                         generation {max_new_tokens | batch_size, stream}, samples {n, seed},
                         run {world_size, device, dtype, elapsed_s, ...}, synthetic {...}, merged_from
                         mode: generate | teacher-forced | synthetic | imported | mixed (merged)
                         activation.kind: product (|a| > t_l, thresholds per layer), sign (W_gate x > 0),
                         relu (a != 0), powerinfer (imported counts; definition PowerInfer's); written
                         in profiles written before the renaming (2026-12): magnitude (= product), gate (= sign)
                         token_count may be {"prefill": null, "unknown": true} (PowerInfer import)
    counts.safetensors   active_count_prefill [n_layers, n_ff] int64
                         active_count_decode  [n_layers, n_ff] int64
                         hist_prefill         [n_layers, bins + 2] int64   (|a| histogram, see HIST_*)
                         hist_decode          [n_layers, bins + 2] int64
    samples.safetensors  (optional) sampled (FFN input, active mask) pairs for predictor training:
                         x     [n, n_layers, dim]  float16  FFN input of layer l (after ffn_norm)
                         mask  [n, n_layers, n_ff] bool     active under the profile's activation definition
                         phase [n]                 uint8    0 prefill token, 1 decode token
                         Row j is one token position seen by every layer, so x[:, l] -> mask[:, l] is
                         layer l's training set. Positions are a uniform sample of all profiled token
                         positions: each gets a pseudo-random key from (seed, prompt id, position) and
                         the n smallest keys are kept (so the sample does not depend on the order or
                         sharding of prompts); rows are sorted by key. Merging concatenates samples.
    sequences.safetensors (optional, `profile run --per-sequence`) per-sequence counts: prefill [S, L, F],
                         continuation counts per block of `block` tokens, token counts (persequence.py);
                         manifest "sequences": {n, block, ids}. Merging concatenates them.

`active_count` — the one [n_layers, n_ff] array the solver reads — is prefill + decode. In
`teacher-forced` mode the prompt's tokens are counted as prefill and the reference continuation's as
decode, so "decode" always means tokens the model produced (or would have) one at a time.
Profiles of the same model and activation definition merge by summing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hotcold.artifacts import ModelArtifact, atomic_dir, file_record, read_manifest, verify_files, write_manifest
from hotcold.errors import IncompatibleError, InputError

KIND = "profile"
FORMAT_VERSION = 1

# Magnitude histogram of |a|: bin 0 holds |a| < HIST_LO (including exact zeros), bins 1..HIST_BINS are
# log-spaced between HIST_LO and HIST_HI, the last bin holds |a| >= HIST_HI. 64 bins per decade
# resolve a threshold to within 3.7% of its value, finer than any sparsity target needs.
HIST_LO = 1e-6
HIST_HI = 1e4
HIST_BINS = 640


def hist_edges(lo: float = HIST_LO, hi: float = HIST_HI, bins: int = HIST_BINS) -> np.ndarray:
    """The bins + 1 edges of the log-spaced part of the histogram."""
    return np.logspace(np.log10(lo), np.log10(hi), bins + 1)


def threshold_from_hist(hist: np.ndarray, sparsity: float, lo: float = HIST_LO, hi: float = HIST_HI,
                        bins: int = HIST_BINS) -> float:
    """Inverse CDF of one layer's |a| histogram [bins + 2]: the t below which a fraction `sparsity` falls.

    Log-interpolated inside the bin that crosses `sparsity` (the profiler calibrates --sparsity with this
    same function, so a threshold derived later from a saved profile is the one a run would use).
    """
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity {sparsity} is outside [0, 1)", "pass a fraction such as 0.5")
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        raise InputError("an empty |a| histogram has no threshold", "profile some tokens first")
    cdf = np.cumsum(hist) / total
    k = int(np.searchsorted(cdf, sparsity, side="left"))
    edges = hist_edges(lo, hi, bins)
    # bin k covers [edges[k-1], edges[k]) for 1 <= k <= bins; interpolate inside it.
    if k == 0:
        return float(edges[0]) * (sparsity / max(cdf[0], 1e-300))
    if k > len(edges) - 1:
        return float(edges[-1])
    lo_c = cdf[k - 1]
    frac = (sparsity - lo_c) / max(cdf[k] - lo_c, 1e-300)
    return float(edges[k - 1] * (edges[k] / edges[k - 1]) ** frac)


@dataclass(frozen=True)
class Profile(ModelArtifact):
    manifest: dict[str, Any]
    active_count_prefill: np.ndarray  # [n_layers, n_ff] int64
    active_count_decode: np.ndarray  # [n_layers, n_ff] int64
    hist_prefill: np.ndarray  # [n_layers, HIST_BINS + 2] int64
    hist_decode: np.ndarray  # [n_layers, HIST_BINS + 2] int64
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # optional "x", "mask"
    path: Path | None = None
    sequences: dict[str, np.ndarray] = field(default_factory=dict)  # optional per-sequence counts (persequence.py)

    # ---- derived views -------------------------------------------------------------------------
    @property
    def token_count(self) -> dict[str, int | None]:
        return dict(self.manifest["token_count"])

    @property
    def n_layers(self) -> int:
        return int(self.active_count_decode.shape[0])

    @property
    def n_ff(self) -> int:
        return int(self.active_count_decode.shape[1])

    @property
    def active_count(self) -> np.ndarray:
        return self.active_count_prefill + self.active_count_decode

    def frequencies(self, phase: str = "decode") -> np.ndarray:
        """f_i = active tokens / profiled tokens, [n_layers, n_ff] float64.

        phase: "decode" (what batch-1 generation sees; falls back to "all" when no decode tokens were
        profiled), "prefill", or "all". A profile with an unknown token count (PowerInfer import) is
        normalised by its largest count and says so in manifest["token_count"]["unknown"].
        """
        tc = self.token_count
        if phase == "decode" and not tc.get("decode"):
            phase = "all"
        counts = {"decode": self.active_count_decode, "prefill": self.active_count_prefill,
                  "all": self.active_count}[phase]
        n = {"decode": tc.get("decode"), "prefill": tc.get("prefill"),
             "all": None if tc.get("prefill") is None else (tc.get("prefill") or 0) + (tc.get("decode") or 0)}[phase]
        if not n:
            n = max(int(counts.max()), 1)
        return counts.astype(np.float64) / float(n)

    def magnitude_threshold(self, layer: int, sparsity: float, phase: str = "all") -> float:
        """t_l such that a fraction `sparsity` of the layer's |a| values fall below it (inverse CDF)."""
        if not 0.0 <= sparsity < 1.0:
            raise InputError(f"sparsity {sparsity} is outside [0, 1)", "pass a fraction such as 0.5")
        hist = {"prefill": self.hist_prefill, "decode": self.hist_decode,
                "all": self.hist_prefill + self.hist_decode}[phase][layer]
        if hist.sum() == 0:
            raise InputError(f"the profile has no magnitude samples for layer {layer} ({phase})",
                             "use a profile made by `hotcold profile run`, or phase 'all'")
        return threshold_from_hist(hist, sparsity, **self.manifest["histogram"])

    def magnitude_thresholds(self, sparsity: float, phase: str = "all") -> list[float]:
        return [self.magnitude_threshold(l, sparsity, phase) for l in range(self.active_count_decode.shape[0])]

    # ---- compatibility and merging -------------------------------------------------------------
    def compatibility_key(self) -> dict[str, Any]:
        m = self.manifest
        return {"fingerprint": m["model"]["fingerprint"], "activation": m["activation"],
                "histogram": m["histogram"]}

    def check_compatible(self, other: Profile) -> None:
        a, b = self.compatibility_key(), other.compatibility_key()
        for key, what in (("fingerprint", "model"), ("activation", "activation definition or thresholds"),
                          ("histogram", "histogram binning")):
            if a[key] != b[key]:
                raise IncompatibleError(
                    f"profiles {self.path or '?'} and {other.path or '?'} differ in {what} "
                    f"({_short(a[key])} vs {_short(b[key])})",
                    "merge only profiles of the same model made with the same --activation and threshold")

    # ---- I/O -----------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        from safetensors.numpy import save_file

        out = Path(out)
        with atomic_dir(out) as tmp:
            save_file({"active_count_prefill": np.ascontiguousarray(self.active_count_prefill, np.int64),
                       "active_count_decode": np.ascontiguousarray(self.active_count_decode, np.int64),
                       "hist_prefill": np.ascontiguousarray(self.hist_prefill, np.int64),
                       "hist_decode": np.ascontiguousarray(self.hist_decode, np.int64)},
                      str(tmp / "counts.safetensors"))
            files = [file_record(tmp, "counts.safetensors")]
            if self.samples:
                save_file({k: np.ascontiguousarray(v) for k, v in self.samples.items()},
                          str(tmp / "samples.safetensors"))
                files.append(file_record(tmp, "samples.safetensors"))
            if self.sequences:
                save_file({k: np.ascontiguousarray(v) for k, v in self.sequences.items()},
                          str(tmp / "sequences.safetensors"))
                files.append(file_record(tmp, "sequences.safetensors"))
            body = {k: v for k, v in self.manifest.items() if k not in ("kind", "format_version", "producer", "files")}
            write_manifest(tmp, KIND, FORMAT_VERSION, {**body, "files": files})
        return out

    @property
    def has_sequences(self) -> bool:
        """Whether the profile was made with per-sequence records (loaded or not)."""
        return bool(self.sequences) or "sequences" in self.manifest

    @classmethod
    def load(cls, path: str | Path, with_samples: bool = False, with_sequences: bool = False) -> Profile:
        from safetensors.numpy import load_file

        path = Path(path)
        manifest = read_manifest(path, KIND, (FORMAT_VERSION,))
        verify_files(path, manifest, KIND)
        t = load_file(str(path / "counts.safetensors"))
        samples = {}
        if with_samples and (path / "samples.safetensors").exists():
            samples = load_file(str(path / "samples.safetensors"))
        sequences = {}
        if with_sequences and (path / "sequences.safetensors").exists():
            from hotcold.profiler.persequence import check_sequences

            sequences = load_file(str(path / "sequences.safetensors"))
            check_sequences(sequences, t["active_count_decode"].shape[0], t["active_count_decode"].shape[1], str(path))
        return cls(manifest=manifest, active_count_prefill=t["active_count_prefill"],
                   active_count_decode=t["active_count_decode"], hist_prefill=t["hist_prefill"],
                   hist_decode=t["hist_decode"], samples=samples, path=path, sequences=sequences)


def merge(profiles: list[Profile]) -> Profile:
    """Sum compatible profiles. Dataset descriptions are kept as a list of the parts merged."""
    if not profiles:
        raise InputError("no profiles to merge", "pass two or more profile directories")
    first = profiles[0]
    for p in profiles[1:]:
        first.check_compatible(p)
    tc: dict[str, Any] = {"prefill": 0, "decode": 0}
    for p in profiles:
        for k in ("prefill", "decode"):
            v = p.token_count.get(k)
            tc[k] = None if v is None or tc[k] is None else tc[k] + v
    parts = []
    for p in profiles:
        parts.extend(p.manifest.get("merged_from") or [p.manifest.get("dataset")])
    samples: dict[str, np.ndarray] = {}
    if all(p.samples for p in profiles):
        samples = {k: np.concatenate([p.samples[k] for p in profiles]) for k in first.samples}
    sequences: dict[str, np.ndarray] = {}
    manifest = {k: v for k, v in first.manifest.items() if k not in ("files", "sequences")}
    blocks = {(p.manifest.get("sequences") or {}).get("block") for p in profiles}
    if all(p.sequences for p in profiles) and len(blocks) == 1:
        offsets = np.cumsum([0] + [p.sequences["prefill"].shape[0] for p in profiles])
        sequences = {k: np.concatenate([p.sequences[k] + (offsets[j] if k == "block_seq" else 0)
                                        for j, p in enumerate(profiles)]).astype(first.sequences[k].dtype)
                     for k in first.sequences}
        manifest["sequences"] = {"n": int(offsets[-1]), "block": blocks.pop(),
                                 "ids": [i for p in profiles for i in p.manifest["sequences"]["ids"]]}
    modes = {p.manifest.get("mode") for p in profiles}
    if len(modes) > 1:
        manifest["mode"] = "mixed"
    manifest.update(token_count=tc, merged_from=parts,
                    dataset={"name": "merged", "parts": len(parts),
                             "n_prompts": sum(int((d or {}).get("n_prompts") or 0) for d in parts)})
    return Profile(manifest=manifest,
                   active_count_prefill=sum(p.active_count_prefill for p in profiles),
                   active_count_decode=sum(p.active_count_decode for p in profiles),
                   hist_prefill=sum(p.hist_prefill for p in profiles),
                   hist_decode=sum(p.hist_decode for p in profiles), samples=samples, sequences=sequences)


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."
