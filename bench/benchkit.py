"""What the runtime benchmarks share: the repo root, a timestamped stderr log, and SmolLM2's MBPP
train profile (made once into the bench cache, reused while present) with its hot-first neuron order."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


def train_profile(src, work: Path, prompts: int):
    """(Profile of `prompts` MBPP train tasks, teacher-forced; neuron order by frequency, most frequent first)."""
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.engine import ProfileOptions, run_profile
    from hotcold.workloads import load_dataset

    prof_dir = Path(work) / f"profile-train{prompts}"
    if not (prof_dir / "manifest.json").is_file():
        log(f"profiling {prompts} MBPP train prompts (teacher-forced) -> {prof_dir}")
        run_profile(src, load_dataset("mbpp", "train", limit=prompts), ProfileOptions(mode="teacher-forced"),
                    out=prof_dir)
    prof = Profile.load(prof_dir)
    return prof, np.argsort(-prof.frequencies(), axis=1, kind="stable").astype(np.int32)
