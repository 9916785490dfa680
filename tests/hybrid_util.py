"""Helpers shared by the exporter/runtime/compile tests: placements from arrays, a profile of the tiny model."""

from __future__ import annotations

import numpy as np


def make_placement(src, n_hot, order=None, seed: int = 0, fingerprint: str | None = None):
    """A Placement built from the documented arrays (order [L, F] int32, n_hot [L] int32)."""
    from hotcold.solver.placement import Placement

    cfg = src.config
    if order is None:
        rng = np.random.default_rng(seed)
        order = np.stack([rng.permutation(cfg.n_ff) for _ in range(cfg.n_layers)])
    n_hot = np.broadcast_to(np.asarray(n_hot), (cfg.n_layers,))
    manifest = {"model": {"config": cfg.to_json(), "fingerprint": fingerprint or src.fingerprint}}
    return Placement(manifest=manifest, order=np.asarray(order, np.int32), n_hot=np.asarray(n_hot, np.int32))


def frequency_order(profile) -> np.ndarray:
    return np.argsort(-profile.frequencies(), axis=1, kind="stable").astype(np.int32)


def tiny_profile(src, samples: int = 512, limit: int = 6, split: str = "train"):
    from hotcold.profiler.engine import ProfileOptions, run_profile
    from hotcold.workloads import load_dataset

    ds = load_dataset("embedded", split, limit=limit)
    return run_profile(src, ds, ProfileOptions(mode="teacher-forced", samples=samples)).profile


_SMOLLM_PROFILES: dict = {}


def smollm_profile(src, split: str, limit: int, samples: int):
    """A teacher-forced MBPP profile of SmolLM2 (cached per process: several test modules share it); skips
    the calling test without MBPP."""
    key = (split, limit, samples)
    if key not in _SMOLLM_PROFILES:
        from hotcold.profiler.engine import ProfileOptions, run_profile
        from hotcold.workloads import load_dataset
        from tests.mbpp_util import require_mbpp

        ds = load_dataset(f"mbpp:{require_mbpp()}", split, limit=limit)
        _SMOLLM_PROFILES[key] = run_profile(src, ds, ProfileOptions(mode="teacher-forced", samples=samples)).profile
    return _SMOLLM_PROFILES[key]


def mbpp_teacher_forced(tok, split: str = "test", limit: int = 24, offset: int = 0):
    """(prompt ids, reference-code ids) of MBPP tasks, chat-formatted."""
    from hotcold.workloads import load_dataset, teacher_forced
    from tests.mbpp_util import require_mbpp

    out = []
    for t in load_dataset(f"mbpp:{require_mbpp()}", split, limit=limit, offset=offset).tasks:
        p, c = teacher_forced(t, "chat", tok.render_chat)
        out.append((tok.encode(p), tok.encode(c, add_bos=False)))
    return out
