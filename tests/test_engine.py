"""hotcold.runtime on the CPU at toy shapes: the same engine, kernels and migration code the GPU runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hotcold.runtime.build import from_source
from hotcold.runtime.coldkernel import ColdKernel, numba_available
from hotcold.model.dense import DenseModel
from hotcold.model.registry import load_source

BACKENDS = ["torch"] + (["numba"] if numba_available() else [])
IDS = [1, 5, 9, 22, 7, 100, 3, 64]


@pytest.fixture(scope="module")
def src():
    return load_source("random:tiny")


@pytest.fixture(scope="module")
def ref(src):
    dense = DenseModel.from_source(src, max_len=64)
    return dense.forward(torch.tensor([IDS]))[0]  # [T, V] float32


def _decode(eng, ids):
    out = []
    for t in ids:
        eng.step(t)
        out.append(eng.logits.clone())
    return torch.stack(out)


def _hot(cfg, sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.permutation(cfg.n_ff)[:k] for k in sizes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(256, 256, 256, 256), (0, 0, 0, 0), (10, 128, 256, 0)],
                         ids=["all-gpu", "all-cpu", "split"])
def test_hybrid_equals_dense(src, ref, backend, sizes):
    eng = from_source(src, _hot(src.config, sizes), cold_mode="exact", max_len=64, cpu_backend=backend)
    out = _decode(eng, IDS)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    assert eng.n_segments == 1 + sum(1 + (k > 0) for k in sizes if k < 256)  # graphs per token on CUDA


KERNELS = [("torch", 1, False)] + ([("numba", g, d) for g in (1, 2, 4, 8) for d in (False, True)]
                                   if numba_available() else [])


@pytest.mark.parametrize("backend,group,dynamic", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "threshold", "predictor"])
def test_cold_kernel_modes(backend, group, dynamic, dtype, mode):
    g = torch.Generator().manual_seed(1)
    C, D = 300, 128
    gate = (torch.randn(C, D, generator=g) * 0.4).to(dtype)
    ud = (torch.randn(C, 2 * D, generator=g) * 0.2).to(dtype)
    x = torch.randn(D, generator=g)
    s = torch.nn.functional.silu(gate.double() @ x.double())
    sel = torch.zeros(C, dtype=torch.uint8)
    sel[torch.randperm(C, generator=g)[:43]] = 1  # 43: groups of 2 and 4 leave a remainder per thread
    if mode == "exact":
        m = torch.ones(C, dtype=torch.bool)
    elif mode == "threshold":
        m = s.abs() > 0.3
    else:
        m = sel.bool()
    want = (s * (ud[:, :D].double() @ x.double()) * m) @ ud[:, D:].double()
    act = sel.clone() if mode == "predictor" else torch.full((C,), 7, dtype=torch.uint8)
    counts = np.full(C, 2.0, dtype=np.float32)
    r = ColdKernel(D, backend, group=group, dynamic=dynamic)(x, gate, ud, mode, mask=act if mode == "predictor" else None,
                                                  thr=0.3, active=act, counts=None if mode == "exact" else counts)
    assert r.n_active == int(m.sum())
    assert torch.equal(act.bool(), m)
    if mode != "exact":  # the dynamic mode's statistics, counted by the kernel
        assert np.array_equal(counts, 2.0 + m.numpy())
    assert ((r.y.double() - want).norm() / want.norm()) < 1e-5
    assert r.bytes_read > 0


def test_predictor_mode_with_oracle_equals_threshold_mode(src):
    from hotcold.runtime.selectors import OracleSelector

    cfg = src.config
    hot = _hot(cfg, (30, 60, 90, 120), seed=3)
    thr = [0.2] * cfg.n_layers
    a = from_source(src, hot, cold_mode="threshold", thresholds=thr, max_len=64, sparse_hot=True)
    sel = OracleSelector([src.layer(l)["w_gate"] for l in range(cfg.n_layers)], thr, "cpu")
    b = from_source(src, hot, cold_mode="predictor", selector=sel, thresholds=thr, max_len=64)
    # the hot side of predictor mode is dense, of threshold mode thresholded: compare with all-cold layers
    hot0 = [np.zeros(0, dtype=np.int64)] * cfg.n_layers
    a0 = from_source(src, hot0, cold_mode="threshold", thresholds=thr, max_len=64, sparse_hot=True)
    b0 = from_source(src, hot0, cold_mode="predictor", selector=sel, thresholds=thr, max_len=64)
    assert torch.allclose(_decode(a0, IDS), _decode(b0, IDS), atol=1e-5)
    assert a0.totals.cold_active == b0.totals.cold_active > 0
    _decode(a, IDS[:3]), _decode(b, IDS[:3])  # mixed placements run too


@pytest.mark.parametrize("backend", BACKENDS)
def test_migration_keeps_exact_output(src, ref, backend):
    """Neurons move between GPU slots and the CPU while generating; exact-mode logits stay the dense ones."""
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    cfg = src.config
    hot = _hot(cfg, (10, 50, 200, 100))
    eng = from_source(src, hot, cold_mode="exact", max_len=64, cpu_backend=backend,
                      stat_thresholds=[0.3] * cfg.n_layers)
    cm = CostModel(cfg, preset("h200"), "float32", cold_mode="threshold", ctx_len=64)
    prior = np.zeros((cfg.n_layers, cfg.n_ff))
    for l in range(cfg.n_layers):
        prior[l][hot[l]] = 1.0
    dyn = DynamicPlacement(eng, cm, prior, every=2, alpha=0.9, max_swaps=16, horizon=10**6, margin=0.0)
    out = _decode(eng, IDS)
    dyn.flush()
    assert dyn.stats.neurons > 20 and dyn.stats.decisions >= 3
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    for l in range(cfg.n_layers):  # every slot holds the rows of the neuron it claims
        t = src.layer(l)
        g, c = eng.gl[l], eng.cl[l]
        assert len(g.hot_ids) == len(hot[l])  # the GPU budget is unchanged
        assert torch.equal(g.hot_gu[:, 0], t["w_gate"][g.hot_ids])
        assert torch.equal(g.hot_down, t["w_down"][:, g.hot_ids].t())
        assert torch.equal(c.gate, t["w_gate"][c.cold_ids])
        assert torch.equal(c.up_down[:, cfg.dim:], t["w_down"][:, c.cold_ids].t())
        assert sorted(np.concatenate([g.hot_ids, c.cold_ids]).tolist()) == list(range(cfg.n_ff))
        assert torch.equal(eng.hot_ids_dev[l], torch.as_tensor(g.hot_ids))
    taus = dyn.taus()
    assert all(t is None or 0.0 <= t <= 1.0 for t in taus)


def test_dynamic_moves_hot_neurons_of_a_shifted_workload(src):
    """A sampled workload whose hot neurons are not the placement's: the dynamic mode finds them."""
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.runtime.selectors import SampledPredictor
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    cfg = src.config
    rng = np.random.default_rng(0)
    f_prof = rng.random((cfg.n_layers, cfg.n_ff)) ** 8
    f_run = f_prof[:, ::-1].copy()  # the shift: other neurons are hot now
    hot = [np.argsort(-f_prof[l])[:64] for l in range(cfg.n_layers)]
    sel = SampledPredictor(f_run, cfg.dim, 8, "cpu", torch.float32, bank_rows=64)
    eng = from_source(src, hot, cold_mode="predictor", selector=sel, max_len=128)
    cm = CostModel(cfg, preset("h200"), "float32", cold_mode="predictor", ctx_len=128)
    dyn = DynamicPlacement(eng, cm, f_prof, every=8, alpha=0.5, max_swaps=64, horizon=10**5)

    def share():
        return np.mean([f_run[l][eng.gl[l].hot_ids].sum() / f_run[l].sum() for l in range(cfg.n_layers)])

    before = share()
    eng.step(1)
    for _ in range(40):
        eng.step(None)
    dyn.flush()
    assert share() > before + 0.3
    assert dyn.stats.bytes > 0


def test_dynamic_noise_margin_holds_still_on_a_matched_workload(src):
    """The workload is the profile's: with the noise margin few neurons move; on point estimates many do."""
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.runtime.selectors import SampledPredictor
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    cfg = src.config
    f = np.random.default_rng(0).random((cfg.n_layers, cfg.n_ff)) ** 8
    hot = [np.argsort(-f[l])[:64] for l in range(cfg.n_layers)]
    moved = {}
    for margin in (0.0, 2.0):
        sel = SampledPredictor(f, cfg.dim, 8, "cpu", torch.float32, bank_rows=64)
        eng = from_source(src, hot, cold_mode="predictor", selector=sel, max_len=128)
        cm = CostModel(cfg, preset("h200"), "float32", cold_mode="predictor", ctx_len=128)
        dyn = DynamicPlacement(eng, cm, f, every=8, alpha=0.5, max_swaps=64, horizon=10**5, margin=margin)
        eng.step(1)
        for _ in range(40):
            eng.step(None)
        dyn.flush()
        moved[margin] = dyn.stats.neurons
    assert moved[0.0] > 20 and moved[2.0] <= moved[0.0] // 4, moved


def test_hold_density_moves_thresholds(src):
    cfg = src.config
    eng = from_source(src, _hot(cfg, (64,) * 4), cold_mode="threshold", thresholds=[0.05] * 4, max_len=64)
    eng.hold_density(0.1, gain=0.5)
    eng.step(1)
    for _ in range(20):
        eng.step(None)
    assert all(t > 0.05 for t in eng.thr)  # density was far above 10%: thresholds rose
    d = eng.last_density
    assert np.all(np.abs(d - 0.1) < 0.15), d


def test_from_bundle_equals_dense(src, ref, tmp_path):
    export = pytest.importorskip("hotcold.exporter.export")
    from hotcold.runtime.build import from_bundle
    from hotcold.solver.solve import solve_frequencies

    cfg = src.config
    f = np.random.default_rng(0).random((cfg.n_layers, cfg.n_ff))
    nb = 3 * cfg.dim * 4
    from hotcold.memory import placement_bytes

    fixed = placement_bytes(cfg, [0] * cfg.n_layers, "float32", ctx_len=64).gpu_fixed
    from hotcold.solver.hardware import preset

    plc = solve_frequencies(f, cfg, preset("h200"), policy="fixed", gpu_budget=fixed + 300 * nb, ctx_len=64, dtype="float32")
    export.export_bundle(src, plc, tmp_path / "b", options=export.ExportOptions(dtype="float32", sparsity=None,
                                                                                  threshold=0.0))
    eng = from_bundle(tmp_path / "b", mode="exact", max_len=64)
    assert 0 < sum(g.n_hot for g in eng.gl) < cfg.n_layers * cfg.n_ff
    out = _decode(eng, IDS)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_bench_cli_toy(tmp_path):
    from typer.testing import CliRunner

    from hotcold.bench.cli import register
    import typer

    app = typer.Typer()

    @app.callback()
    def _cb() -> None:
        pass

    register(app)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--layers", "2", "--gpu-budget", "85%", "--device", "cpu",
                                 "--tokens", "2", "--warm", "1", "--dyn-tokens", "4", "--ctx-len", "32",
                                 "--runs", "dense-gpu,hotcold-fixed,hotcold-dynamic", "--out", str(out),
                                 "--cpu-group", "2", "--cpu-schedule", "static"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert {"dense-gpu", "hotcold-fixed", "hotcold-dynamic"} <= set(res["runs"])
    hc = res["runs"]["hotcold-fixed"]
    assert hc["predicted"]["ms_per_token"] > 0 and 0 <= hc["gpu_share"] <= 1
    assert res["weights"].startswith("random")
    bad = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--layers", "99"])
    assert bad.exit_code == 2 and "--layers 99" in bad.output
    for opt, val in (("--cpu-group", "3"), ("--cpu-schedule", "random")):
        bad = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--layers", "2", opt, val])
        assert bad.exit_code == 2 and opt in bad.output and "Traceback" not in bad.output


def test_decode_with_dense_hot_neurons_equals_the_batched_forward(src, tmp_path):
    """threshold mode, gate rule: decode steps with sparse_hot=False (the default) compute what the batched
    torch forward computes per token (hot neurons dense, cold ones by |silu(g)| > t_l); with
    sparse_hot=True the hot ones are thresholded too."""
    export = pytest.importorskip("hotcold.exporter.export")
    from hotcold.runtime.build import from_bundle
    cfg = src.config
    from tests.hybrid_util import make_placement

    plc = make_placement(src, cfg.n_ff // 3)
    t = 0.05  # fires about half of the neurons of the tiny model
    export.export_bundle(src, plc, tmp_path / "b", options=export.ExportOptions(
        dtype="float32", rule="gate", sparsity=None, threshold=t))
    hm = from_bundle(tmp_path / "b", mode="threshold", device="cpu", max_len=64)
    cache = hm.new_cache(1, 64)
    ref = torch.stack([hm.forward(torch.tensor([[tok]]), i, cache, last_only=True, sparse=True)[0, -1]
                       for i, tok in enumerate(IDS)])
    dense_hot = _decode(from_bundle(tmp_path / "b", mode="threshold", max_len=64), IDS)
    sparse_hot = _decode(from_bundle(tmp_path / "b", mode="threshold", max_len=64, sparse_hot=True), IDS)
    assert torch.allclose(dense_hot, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sparse_hot, ref, atol=1e-3)
