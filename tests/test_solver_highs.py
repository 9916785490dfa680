"""The HiGHS backend (`--solver highs`, and `auto` when highspy is installed) against CBC.

hotcold reaches HiGHS through PuLP's `HiGHS` class, which needs the `highspy` package
(`pip install 'hotcold[highs]'`). When it is installed, both backends solve the same hand-checkable
and random instances and must reach the same optimum (placements too where the optimum is unique);
when it is not, asking for it is one clear error and `auto` falls back to CBC. Both paths are real
solves; which one runs depends on the environment (CI does not install highspy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hotcold.errors import InputError
from hotcold.model.config import SHAPES
from hotcold.solver.costmodel import CostModel, ProfileCosts
from hotcold.solver.hardware import preset
from hotcold.solver.policies import adaptive_problem, impact_problem, make_blocks, solve_blocks
from hotcold.solver.solve import solve_frequencies
from hotcold.solver.synth import synthetic_frequencies, synthetic_profile
from tests.test_solver import F_HAND, budget_for, cfg_of, hand, hw_of, layer_us, random_instance


def highs_available() -> bool:
    import pulp

    return bool(pulp.HiGHS(msg=False).available())


needs_highs = pytest.mark.skipif(not highs_available(),
                                 reason="highspy is not installed (pip install 'hotcold[highs]'): HiGHS path not tested")


@pytest.mark.skipif(highs_available(), reason="highspy is installed: the missing-HiGHS error cannot happen")
def test_without_highspy_highs_is_a_clear_error_and_auto_is_cbc():
    with pytest.raises(InputError) as e:
        hand("adaptive", solver="highs")
    assert "HiGHS solver is not installed" in e.value.what and "--solver cbc" in e.value.fix
    assert hand("adaptive", solver="auto").manifest["solver"]["backend"] == "cbc"


@needs_highs
def test_highs_hand_instances_same_optimum_as_cbc():
    """The hand instances of test_solver.py, solved by both backends (µs by hand in the comments there)."""
    cases = [  # (policy, sync µs, C_l, expected hot counts (sorted where layers tie), layer µs or Σf)
        ("adaptive", 0.5, None, [1, 4], 3.9),
        ("adaptive", 2.0, False, [1, 4], 5.4),
        ("adaptive", 2.0, True, [0, 4], 6.4),
        ("impact", 0.5, None, [3, 2], 0.9 + 0.85 + 0.8 + 0.75 + 0.7),
        ("impact", 2.0, True, [4, 0], 0.9 + 0.8 + 0.7 + 0.1),
    ]
    for policy, sync, min_hot, counts, value in cases:
        res = {b: hand(policy, sync_us=sync, min_hot=min_hot, solver=b) for b in ("cbc", "highs")}
        assert res["cbc"].manifest["solver"]["backend"] == "cbc"
        assert res["highs"].manifest["solver"]["backend"] == "highs"
        for b, p in res.items():
            got = p.n_hot.tolist()
            assert (sorted(got) if policy == "adaptive" else got) == counts, (policy, sync, min_hot, b)
            assert p.status == "optimal" and p.manifest["solver"]["gap"] <= 1.001e-9  # mip_gap 1e-9
            if policy == "adaptive":
                assert layer_us(p) == pytest.approx(value)
            else:
                assert p.manifest["solver"]["objective"] == pytest.approx(value)
        assert res["cbc"].totals["modelled_ms_per_token"] == pytest.approx(res["highs"].totals["modelled_ms_per_token"])


@needs_highs
def test_highs_unique_optimum_gives_the_same_placement():
    """Distinct frequencies and threshold mode: one optimal placement, and both backends find it."""
    rng = np.random.default_rng(11)
    L, n = 4, 48
    cfg, hw = cfg_of(L, n), hw_of(cpu_us=1.0, gpu_us=0.05, sync_us=1.0)
    f = rng.permutation(np.linspace(0.01, 0.97, L * n)).reshape(L, n)
    kw = dict(gpu_budget=budget_for(cfg, hw, 70, "threshold"), cold_mode="threshold", group_size=1, mip_gap=1e-12)
    for policy in ("impact", "adaptive"):
        a = solve_frequencies(f, cfg, hw, policy=policy, solver="cbc", **kw)
        b = solve_frequencies(f, cfg, hw, policy=policy, solver="highs", **kw)
        assert (a.n_hot == b.n_hot).all() and (a.hot_mask() == b.hot_mask()).all(), policy


@needs_highs
@pytest.mark.parametrize("seed", range(8))
def test_highs_random_instances_same_optimum_as_cbc(seed):
    """Random small instances (ties, C_l, CPU budgets, one memory bus), both formulations, no reduction too."""
    rng = np.random.default_rng(500 + seed)
    L, n = 3, int(rng.integers(8, 30))
    cfg, hw, mode, f = random_instance(rng, L, n)
    cm = CostModel(cfg, hw, "float32", cold_mode=mode, ctx_len=64)
    pc = ProfileCosts(cm, -np.sort(-f, axis=1))
    blocks = make_blocks(L, n, int(rng.integers(1, 4)), pc.min_hot() if rng.random() < 0.5 else None)
    k_hi = int(rng.integers(L, L * n + 1))
    k_lo = int(rng.integers(0, k_hi // 2 + 1))
    for build in (adaptive_problem, impact_problem):
        prob = build(pc, blocks, k_lo, k_hi)
        for reduce, form in ((True, "incremental"), (False, "epigraph")):
            c = solve_blocks(prob, mip_gap=1e-9, solver="cbc", reduce=reduce, formulation=form)
            h = solve_blocks(prob, mip_gap=1e-9, solver="highs", reduce=reduce, formulation=form)
            assert (c.backend, h.backend) == ("cbc", "highs")
            assert h.objective == pytest.approx(c.objective, rel=1e-7, abs=1e-9), (prob.kind, reduce, form)
            assert k_lo <= h.n_hot.sum() <= k_hi and h.status == "optimal"


@needs_highs
def test_highs_at_scale_matches_cbc():
    """A 70B-shaped slice (8 layers, full width) where the GPU side binds: both backends, same latency."""
    cfg = SHAPES["llama2-70b"].replace(n_layers=8)
    f = synthetic_frequencies(8, cfg.n_ff, seed=5)
    kw = dict(gpu_budget="200GiB", cold_mode="predictor", ctx_len=4096, group_size=64)
    a = solve_frequencies(f, cfg, preset("h200"), policy="adaptive", solver="cbc", **kw)
    b = solve_frequencies(f, cfg, preset("h200"), policy="adaptive", solver="highs", **kw)
    gap = max(a.manifest["solver"]["gap"], b.manifest["solver"]["gap"], 1e-4)
    assert b.totals["modelled_ms_per_token"] == pytest.approx(a.totals["modelled_ms_per_token"], rel=gap)


@needs_highs
def test_highs_banner_stays_off_stdout(tmp_path):
    """highspy prints a banner from C++ on fd 1 when a model is created; `--json` output must stay JSON."""
    from hotcold.model.config import SHAPES as S

    prof = tmp_path / "prof"
    synthetic_profile(S["smollm2-135m"], seed=2, tokens=4096).save(prof)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-m", "hotcold", "solve", "--profile", str(prof), "--preset", "h200",
                        "--gpu-budget", "250MiB", "--ctx-len", "2048", "--solver", "highs", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)  # nothing but the result on stdout
    assert obj["policy"] == "adaptive" and obj["status"] == "optimal"
    assert "HiGHS" in r.stderr  # the banner went to stderr, with the progress lines
