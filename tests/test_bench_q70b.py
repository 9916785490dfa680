"""bench/bench_q70b.py (issue 15's 80-layer 4-bit benchmark) end to end at toy shape on the CPU: the same
per-run processes, hot-set sizing under a cap, threshold tuning and sampled predictor selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba", reason="the quantized cold kernel needs numba (pip install 'hotcold[gpu]')")

REPO = Path(__file__).resolve().parents[1]


def test_q70b_runs_at_toy_shape(tmp_path):
    from hotcold.workloads import frequencies as wl

    L, n_ff = 4, 256  # the tiny shape
    f = wl.synthetic(L, n_ff, 0)
    f = np.clip(0.15 + 0.6 * f / f.max(), 0, 1)  # a flat, SwiGLU-like spread of frequencies
    work = tmp_path / "work"
    work.mkdir()
    np.savez_compressed(work / "workloads.npz", train=f, test=np.clip(f * 0.95, 0, 1), humaneval=f)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "bench_q70b.py"), "--shape", "tiny", "--layers", str(L),
           "--device", "cpu", "--work", str(work), "--out", str(out), "--cap", "0.0004", "--slack", "0",
           "--tokens", "4", "--warm", "2", "--rounds", "1", "--predictor-rank", "8",
           "--runs", "swiglu-threshold,relu-predictor"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / f"q70b_q4_{L}L.json").read_text())
    assert set(res["runs"]) == {"swiglu-threshold", "relu-predictor"}
    for name, r in res["runs"].items():
        assert "error" not in r, (name, r.get("stderr_tail"))
        assert r["ms_per_token"] > 0 and r["layers"] == L and r["quant"] == "q4"
        # the cap decides the hot set: some neurons on each side, and the account says what the GPU side holds
        assert 0 < r["n_hot_total"] < L * n_ff
        assert r["account_gpu_bytes"] > 0
    th = res["runs"]["swiglu-threshold"]
    # the tuned thresholds give each layer its cold active fraction (the test workload's cold mean frequency)
    assert th["measured_cold_active_fraction"] == pytest.approx(th["target_cold_active_fraction"], abs=0.06)
    relu = res["runs"]["relu-predictor"]
    assert relu["measured_cold_active_fraction"] == pytest.approx(0.10, abs=0.03)
    assert relu["gpu_share_of_activations"] > relu["gpu_neuron_share"]  # a skewed workload: the hot set pays
