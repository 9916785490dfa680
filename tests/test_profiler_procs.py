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
import pytest

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


def in_process(model: str, args: dict, **opts):
    """The single-process reference, run here with one thread (as torchrun's workers have)."""
    import torch

    from hotcold.profiler.engine import ProfileOptions, run_profile
    from hotcold.workloads import load_dataset

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_profile(model, load_dataset("embedded", **args), ProfileOptions(**opts)).profile
    finally:
        torch.set_num_threads(n)


def test_torchrun_two_processes_equal_one(tmp_path):
    from hotcold.profiler.activation import ActivationSpec

    # --sparsity calibrates across ranks (all-reduced histograms); --samples gathers every rank's share
    two = hotcold_run("-m", TINY, "-d", "embedded", "--limit", "7", "-n", "6", "--sparsity", "0.6",
                      "--calibration-prompts", "3", "--samples", "12", "--no-progress", "--json",
                      "-o", str(tmp_path / "two"),
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert two.returncode == 0, two.stderr
    out = json.loads(two.stdout)  # rank 0 alone prints
    assert out["world_size"] == 2 and out["prompts"] == 7
    one = in_process(TINY, {"limit": 7}, max_new_tokens=6, activation=ActivationSpec(sparsity=0.6),
                     calibration_prompts=3, samples=12)
    b = Profile.load(tmp_path / "two", with_samples=True)
    assert_same(one, b)
    for k in ("x", "mask", "phase"):
        np.testing.assert_array_equal(one.samples[k], b.samples[k])
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


@pytest.fixture
def children_take_sigint():
    """The subprocesses started here act on SIGINT, as a terminal's Ctrl-C would reach them.

    A job started with `&` from a non-interactive shell (a CI step, `nohup ... &`) has SIGINT ignored,
    and an ignored signal stays ignored across fork and exec: Python then installs no KeyboardInterrupt
    handler, so the run never sees the Ctrl-C this test sends and finishes with exit 0. A handled signal
    is reset to the default at exec, so a handler here gives the children Python's usual Ctrl-C."""
    old = signal.getsignal(signal.SIGINT)
    if old == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def checkpoint_done(ck: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(ck), framework="numpy") as f:
        return int(json.loads(f.metadata()["hotcold"])["done"])


def test_interrupted_and_killed_run_leave_no_profile_and_resume(tmp_path, children_take_sigint):
    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.engine import ProfileOptions, run_profile

    model = "random:tiny:max_seq_len=1024,n_layers=8"
    out = tmp_path / "prof"
    ck = tmp_path / ".prof.checkpoint" / "rank0-of-1.safetensors"
    cmd = [sys.executable, "-m", "hotcold", "profile", "run", "-m", model, "-d", "embedded", "--limit", "16",
           "-n", "24", "--threshold", "0.1", "--checkpoint-every", "2", "--no-progress", "--json", "-o", str(out)]

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
    first = checkpoint_done(ck)

    # 2. the same command resumes (its next checkpoint is further on); SIGKILL it there
    mtime = ck.stat().st_mtime_ns
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    try:
        wait_for_checkpoint(proc, ck, after_ns=mtime)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    second = checkpoint_done(ck)
    assert second > first  # continued, not restarted
    assert not out.exists()  # nothing half-written where the profile goes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prof.tmp")]

    # 3. finish (here, in-process): it resumes from the last checkpoint and equals an uninterrupted run
    opts = dict(max_new_tokens=24, activation=ActivationSpec(threshold=0.1), checkpoint_every=2)
    from hotcold.workloads import load_dataset

    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_profile(model, load_dataset("embedded", limit=16), ProfileOptions(**opts), out=out)
    finally:
        torch.set_num_threads(n)
    assert res.resumed_from == second
    assert not ck.parent.exists()
    assert_same(Profile.load(out), in_process(model, {"limit": 16}, **opts))
