"""Profiler across processes: torchrun with 2 CPU processes == one process, and a killed run leaves no
Profile and resumes. Each test launches `python -m ...` subprocesses (a few seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hotcold.profiler.artifact import Profile

REPO = Path(__file__).resolve().parents[1]
TINY = "random:tiny:max_seq_len=1024"


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def hotcold_run(*args: str, launcher: tuple[str, ...] = (), timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `hotcold profile run` in its own session; on timeout the whole group (torchrun's workers too) dies."""
    cmd = [sys.executable, *launcher, "-m", "hotcold", "profile", "run", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def assert_same(a: Profile, b: Profile) -> None:
    for name in ("active_count_prefill", "active_count_decode", "hist_prefill", "hist_decode"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.token_count == b.token_count
    assert a.manifest["activation"] == b.manifest["activation"]


def test_torchrun_two_processes_equal_one(tmp_path):
    # --sparsity calibrates across ranks (all-reduced histograms); --samples gathers every rank's share
    args = ["-m", TINY, "-d", "embedded", "--limit", "7", "-n", "6", "--sparsity", "0.6", "--calibration-prompts",
            "3", "--samples", "12", "--no-progress", "--json"]
    one = hotcold_run(*args, "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = hotcold_run(*args, "-o", str(tmp_path / "two"),
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert two.returncode == 0, two.stderr
    out = json.loads(two.stdout)  # rank 0 alone prints
    assert out["world_size"] == 2 and out["prompts"] == 7
    a, b = Profile.load(tmp_path / "one", with_samples=True), Profile.load(tmp_path / "two", with_samples=True)
    assert_same(a, b)
    for k in ("x", "mask", "phase"):
        np.testing.assert_array_equal(a.samples[k], b.samples[k])
    assert b.manifest["run"]["world_size"] == 2
    assert not list(tmp_path.glob(".two*"))  # checkpoints and temp dirs cleaned up


def wait_for_checkpoint(proc: subprocess.Popen, ck: Path, after_ns: int = 0) -> None:
    """Wait until the run (re)writes its checkpoint file."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if ck.exists() and ck.stat().st_mtime_ns > after_ns:
            return
        time.sleep(0.005)
    raise AssertionError(f"no new checkpoint (the run exited with {proc.poll()})")


def test_interrupted_and_killed_run_leave_no_profile_and_resume(tmp_path):
    import torch

    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.engine import ProfileOptions, run_profile
    from hotcold.workloads import load_dataset

    model = "random:tiny:max_seq_len=1024,n_layers=8"
    out = tmp_path / "prof"
    ck = tmp_path / ".prof.checkpoint" / "rank0-of-1.safetensors"
    args = ["-m", model, "-d", "embedded", "--limit", "32", "-n", "32", "--threshold", "0.1",
            "--checkpoint-every", "2", "--no-progress", "--json", "-o", str(out)]
    cmd = [sys.executable, "-m", "hotcold", "profile", "run", *args]

    # 1. Ctrl-C after the first checkpoint: one line saying how to resume, exit 130, no profile
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        wait_for_checkpoint(proc, ck)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "re-run the same command to resume" in stderr and "Traceback" not in stderr
    assert not out.exists()

    # 2. the same command resumes; SIGKILL it once it has written a newer checkpoint
    first = ck.stat().st_mtime_ns
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    try:
        wait_for_checkpoint(proc, ck, after_ns=first)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert not out.exists()  # nothing half-written where the profile goes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prof.tmp")]

    # 3. and again: it finishes from the last checkpoint, equal to an uninterrupted run
    again = hotcold_run(*args)
    assert again.returncode == 0, again.stderr
    res = json.loads(again.stdout)
    assert res["resumed_from_prompt"] >= 4 and res["resumed_from_prompt"] % 2 == 0
    assert not ck.parent.exists()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fresh = run_profile(model, load_dataset("embedded", limit=32),
                            ProfileOptions(max_new_tokens=32, activation=ActivationSpec(threshold=0.1))).profile
    finally:
        torch.set_num_threads(n)
    assert_same(Profile.load(out), fresh)
