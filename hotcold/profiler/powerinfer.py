"""Import PowerInfer's profiler output: a directory of `activation_{i}.pt`, one per layer, each a 1-D tensor
of per-neuron activation counts (what PowerInfer's `solver.py` reads with `torch.load`).

Layers are ordered by the integer in the file name, never by sorting names as strings (PowerInfer's
exporter did that and gave layer 10 layer 2's statistics, issue #247). The files carry no token count:
pass it when known, otherwise the Profile records the count as unknown and frequencies are normalised
by the largest count (Profile.frequencies). PowerInfer profiles whole texts in forward passes, so the
counts are stored as prefill.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hotcold.artifacts import sha256_file
from hotcold.errors import InputError
from hotcold.model.weights import WeightSource
from hotcold.profiler.activation import HISTOGRAM, manifest_entry
from hotcold.profiler.artifact import Profile

PATTERN = re.compile(r"^activation_(\d+)\.pt$")


def find_layer_files(directory: str | Path) -> dict[int, Path]:
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d} is not a directory", "pass the directory holding PowerInfer's activation_{i}.pt files")
    files: dict[int, Path] = {}
    for p in d.iterdir():
        m = PATTERN.match(p.name)
        if m:
            i = int(m.group(1))
            if i in files:
                raise InputError(f"{d} has two files for layer {i} ({files[i].name}, {p.name})",
                                 "keep one activation file per layer")
            files[i] = p
    if not files:
        raise InputError(f"{d} has no activation_{{i}}.pt files", "pass PowerInfer's activation directory")
    return dict(sorted(files.items()))  # integer order


def _load_counts(path: Path, n_ff: int, tokens: int | None) -> np.ndarray:
    import torch

    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted errors for corrupt or pickled-object files
        raise InputError(f"{path} is not a readable tensor file ({type(e).__name__})",
                         "pass PowerInfer's activation files (torch.save of one tensor per layer)") from None
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{path} holds a {type(t).__name__}, not a tensor", "pass PowerInfer's activation files")
    a = t.detach().double().reshape(-1).numpy() if t.dim() <= 2 and t.numel() == n_ff else None
    if a is None:
        raise InputError(f"{path} has shape {tuple(t.shape)}; the model has {n_ff} FFN neurons per layer",
                         "import with the --model these activations were profiled on")
    if not np.isfinite(a).all() or (a < 0).any():
        raise InputError(f"{path} holds negative or non-finite values", "the file is not an activation count")
    if np.all(a == np.round(a)):
        counts = a.astype(np.int64)
    elif tokens is not None and a.max() <= 1.0:
        counts = np.rint(a * tokens).astype(np.int64)  # frequencies: back to counts
    else:
        raise InputError(f"{path} holds fractional values (e.g. {a[a != np.round(a)][0]:.4g})",
                         "these look like frequencies: pass --tokens N (the tokens profiled) to convert them")
    if tokens is not None and counts.max() > tokens:
        raise InputError(f"{path} has a count of {counts.max()}, more than --tokens {tokens}",
                         "pass the number of tokens PowerInfer profiled, or leave --tokens out")
    return counts


def import_powerinfer(directory: str | Path, source: WeightSource, tokens: int | None = None) -> Profile:
    """A Profile from PowerInfer's activation_{i}.pt files for the model `source` (shape checked)."""
    cfg = source.config
    if tokens is not None and tokens < 1:
        raise InputError(f"--tokens must be >= 1, got {tokens}", "pass the number of tokens profiled, or leave it out")
    files = find_layer_files(directory)
    want = list(range(cfg.n_layers))
    if list(files) != want:
        missing = sorted(set(want) - set(files))
        extra = sorted(set(files) - set(want))
        what = (f"missing layers {missing[:8]}" if missing else "") + (" and " if missing and extra else "") + \
               (f"layers {extra[:8]} beyond the model's {cfg.n_layers}" if extra else "")
        raise InputError(f"{directory}: {what}", f"the model has {cfg.n_layers} layers; import with the model "
                                                 "these activations were profiled on")
    counts = np.stack([_load_counts(files[i], cfg.n_ff, tokens) for i in want])
    hist = np.zeros((cfg.n_layers, HISTOGRAM["bins"] + 2), np.int64)
    manifest = {
        "model": source.manifest_entry(),
        "dataset": {"name": "powerinfer-import", "kind": "powerinfer", "path": str(Path(directory)),
                    "files": [{"layer": i, "name": files[i].name, "sha256": sha256_file(files[i])} for i in want],
                    "n_prompts": None},
        "mode": "imported",
        "activation": manifest_entry("powerinfer", None, None),
        "calibration": None,
        "token_count": {"prefill": tokens, "decode": 0, "unknown": tokens is None},
        "histogram": dict(HISTOGRAM),
        "samples": None,
    }
    return Profile(manifest=manifest, active_count_prefill=counts, active_count_decode=np.zeros_like(counts),
                   hist_prefill=hist, hist_decode=hist.copy())
