"""The profiler (design.md §3): which FFN neurons fire on a workload, written as a Profile.

Public API (imported lazily: `import hotcold.profiler` loads neither torch nor numpy):

    run_profile(source, workload, opts, *, out, progress, model) -> RunResult   engine.py
    profile_dataset(model, dataset, split, *, limit, offset, opts, out) -> RunResult
    ProfileOptions, RunResult, ActivationSpec, PromptTokens, encode_tasks
    Profile, merge, threshold_from_hist                                      artifact.py
    synth_profile(cfg, skew, seed, *, density, prefill_tokens, decode_tokens, source) -> Profile
    import_powerinfer(directory, source, tokens) -> Profile
    summary, layer_summary, gini, neurons_covering, plot_frequencies         stats.py
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_profile": "engine", "profile_dataset": "engine", "ProfileOptions": "engine", "RunResult": "engine",
    "ActivationSpec": "activation", "PromptTokens": "sequences", "encode_tasks": "sequences",
    "Profile": "artifact", "merge": "artifact", "threshold_from_hist": "artifact",
    "synth_profile": "synth", "import_powerinfer": "powerinfer",
    "summary": "stats", "layer_summary": "stats", "gini": "stats", "neurons_covering": "stats",
    "plot_frequencies": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hotcold.profiler.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hotcold.profiler' has no attribute {name!r}")
