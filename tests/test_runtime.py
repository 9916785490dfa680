"""Runtime on the tiny random model: exact == dense for every placement and layout, threshold mode ==
the dense model with the same neurons zeroed, per-token semantics of sparse prefill, predictor mode,
measurements, the GPU budget check, decode kernels equal to the batched forward, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hotcold.errors import InfeasibleError, InputError
from hotcold.exporter.export import ExportOptions, export_bundle
from hotcold.model.dense import DenseModel
from hotcold.model.generate import generate
from hotcold.runtime import load
from hotcold.runtime.build import from_bundle
from hotcold.bundle import Bundle
from tests.hybrid_util import frequency_order, make_placement, tiny_profile
from tests.fp64_util import assert_as_exact_as_dense

PLACEMENTS = {"all_gpu": [256] * 4, "all_cpu": [0] * 4, "split": [0, 64, 200, 256]}
IDS = [1, 17, 200, 33, 4, 99, 123, 7, 45, 300, 12, 8]


@pytest.fixture(scope="module")
def src():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def dense(src):
    return DenseModel.from_source(src)


@pytest.fixture(scope="module")
def dense64(src):
    return DenseModel.from_source(src, dtype=torch.float64)


@pytest.fixture(scope="module")
def profile(src):
    return tiny_profile(src)


@pytest.fixture(scope="module")
def bundles(src, profile, tmp_path_factory):
    """(placement name, rule) -> bundle path; the product rule is written in the split CPU layout, the gate
    rule in the bundled one ("product-bundled": the product rule on the bundled layout)."""
    root = tmp_path_factory.mktemp("bundles")
    order = frequency_order(profile)
    out = {}
    for name, n_hot in PLACEMENTS.items():
        for rule, layout in (("product", "split"), ("gate", "bundled"), ("product-bundled", "bundled")):
            p = root / f"{name}-{rule}"
            export_bundle(src, make_placement(src, n_hot, order), p, profile=profile,
                          options=ExportOptions(rule=rule.split("-")[0], cpu_layout=layout, sparsity=0.5))
            out[name, rule] = p
    return out


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("rule", ["product", "gate", "product-bundled"])
def test_exact_equals_dense(bundles, dense, dense64, name, rule):
    """As exact as the dense fp32 model, measured against the float64 one (tests/fp64_util.py)."""
    m = load(bundles[name, rule], mode="exact")
    x = torch.tensor([IDS])
    assert_as_exact_as_dense(m.forward(x), dense.forward(x), dense64.forward(x), f"{name}/{rule}")
    gd, gr = generate(dense, IDS[:5], 16, keep_logits=True), generate(m, IDS[:5], 16, keep_logits=True)
    assert gd.new_ids == gr.new_ids
    ref = dense64.forward(torch.tensor([IDS[:5] + gd.new_ids]))[0, 4: 4 + len(gd.logits)]
    assert_as_exact_as_dense(torch.stack(gr.logits), torch.stack(gd.logits), ref, f"{name}/{rule}, decode")


def _masked_dense_hook(src, bundle, rule):
    """The dense model with, per token, every cold neuron whose rule value is <= t_l zeroed."""
    ts = bundle.thresholds
    layers = [src.layer(i) for i in range(src.config.n_layers)]
    cold = [bundle.cold_index(i).long() for i in range(src.config.n_layers)]

    def hook(layer, x, a):
        v = F.silu(F.linear(x, layers[layer]["w_gate"])) if rule == "gate" else a
        keep = torch.ones_like(a, dtype=torch.bool)
        keep[..., cold[layer]] = v[..., cold[layer]].abs() > ts[layer]
        return a * keep

    return hook


@pytest.mark.parametrize("name", ["all_cpu", "split"])
@pytest.mark.parametrize("rule", ["product", "gate", "product-bundled"])
def test_threshold_equals_masked_dense(src, bundles, dense, name, rule):
    m = load(bundles[name, rule], mode="threshold", prefill="sparse")
    x = torch.tensor([IDS])
    want = dense.forward(x, hook=_masked_dense_hook(src, m.bundle, rule.split("-")[0]))
    torch.testing.assert_close(m.forward(x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, dense.forward(x), atol=1e-3)  # sparsity did change something


@pytest.mark.parametrize("rule", ["product", "gate", "product-bundled"])
def test_sparse_prefill_is_per_token(bundles, rule):
    """Sparse prefill of T tokens == T single-token decode steps (each token has its own active set)."""
    m = load(bundles["split", rule], mode="threshold", prefill="sparse")
    full = m.forward(torch.tensor([IDS]))[0]
    cache = m.new_cache(1, len(IDS))
    steps = [m.forward(torch.tensor([[t]]), i, cache)[0, 0] for i, t in enumerate(IDS)]
    torch.testing.assert_close(full, torch.stack(steps), atol=1e-5, rtol=1e-5)


def test_threshold_zero_is_exact(bundles, dense):
    m = load(bundles["split", "product"], mode="threshold", prefill="sparse", thresholds=0.0)
    x = torch.tensor([IDS])
    torch.testing.assert_close(m.forward(x), dense.forward(x), atol=1e-5, rtol=1e-5)


def test_dense_prefill_default(bundles, dense):
    m = load(bundles["all_cpu", "product"], mode="threshold")
    x = torch.tensor([IDS])
    torch.testing.assert_close(m.forward(x), dense.forward(x), atol=1e-5, rtol=1e-5)  # prompt computed exactly
    out = m.forward(torch.tensor([[5]]), len(IDS), None)  # decode step: sparse
    assert out.shape == (1, 1, 512)


def test_measurements(bundles):
    for name, share in (("all_gpu", 1.0), ("all_cpu", 0.0)):
        m = load(bundles[name, "product"], mode="threshold")
        g = m.generate(IDS[:4], 6)
        rep = m.report()
        d = rep["decode"]
        assert d["tokens"] == len(g.new_ids) - 1 and rep["prefill"]["tokens"] == 4
        assert d["gpu_share"] == share
        assert 0.3 < d["active_fraction"] < 0.7  # 50% target sparsity
        assert len(d["layers"]) == 4 and all(layer["gpu_ms_per_token"] > 0 for layer in d["layers"])
        cpu_ms = sum(layer["cpu_ms_per_token"] for layer in d["layers"])
        assert (cpu_ms > 0) == (name == "all_cpu")
        mem = rep["memory"]
        assert mem["gpu"]["weight_bytes"] > 0 and mem["cpu"]["peak_rss_bytes"] > 0 and mem["shared_memory"]
        assert (mem["cpu"]["weight_bytes"] == 0) == (name == "all_gpu")
    m = load(bundles["split", "product"], mode="threshold")
    m.generate(IDS[:4], 6)
    assert 0.0 < m.report()["decode"]["gpu_share"] < 1.0


def test_gpu_budget_refused(bundles):
    b = Bundle.load(bundles["split", "product"])
    need = b.account(ctx_len=64).gpu_total
    from_bundle(b, mode="exact", gpu_budget=need, max_len=64)
    with pytest.raises(InfeasibleError, match="GPU budget .* smaller than bundle"):
        from_bundle(b, mode="exact", gpu_budget=need - 1, max_len=64)
    with pytest.raises(InfeasibleError):
        from_bundle(b, mode="exact", gpu_budget="1KiB")


def test_threshold_mode_needs_thresholds(src, tmp_path):
    export_bundle(src, make_placement(src, 64), tmp_path / "b", options=ExportOptions())
    load(tmp_path / "b", mode="exact")
    with pytest.raises(InputError, match="no activation thresholds"):
        load(tmp_path / "b", mode="threshold")
    with pytest.raises(InputError, match="no predictors"):
        load(tmp_path / "b", mode="predictor", thresholds=0.1)


@pytest.mark.parametrize("name", ["all_cpu", "split"])
@pytest.mark.parametrize("layout", ["product", "product-bundled", "gate"])
def test_decode_backends_agree(bundles, name, layout):
    """The decode step's cold kernel (numba when installed, and torch; the split layout's compiled
    threshold-and-sum) equals the batched torch forward over the same tokens with sparse=True: the same
    per-token rule, whichever kernel and layout compute it."""
    from hotcold.runtime.coldkernel import numba_available

    r = load(bundles[name, layout], mode="threshold")
    cache = r.new_cache(1, len(IDS))
    r.forward(torch.tensor([IDS[:1]]), 0, cache)  # a dense prefill of the first token, as generate does
    ref = r.forward(torch.tensor([IDS[1:]]), 1, cache, sparse=True)[0]
    for backend in ["torch"] + (["numba"] if numba_available() else []):
        m = load(bundles[name, layout], mode="threshold", cpu_backend=backend, max_len=len(IDS) + 1)
        assert m.report()["kernel"] == backend
        m.prefill(IDS[:1])
        rows = [m.logits.clone()]
        for t in IDS[1:]:
            m.step(t)
            rows.append(m.logits.clone())
        torch.testing.assert_close(torch.stack(rows[1:]), ref, atol=2e-4, rtol=1e-4)


def test_batch_of_two(bundles, dense):
    m = load(bundles["split", "gate"], mode="exact")
    x = torch.tensor([IDS[:6], IDS[6:]])
    torch.testing.assert_close(m.forward(x), dense.forward(x), atol=1e-5, rtol=1e-5)


def test_bf16_bundle_runs_close_to_dense_bf16(src, profile, tmp_path):
    export_bundle(src, make_placement(src, [0, 64, 200, 256], frequency_order(profile)), tmp_path / "b",
                  options=ExportOptions(dtype="bf16", sparsity=None))
    m = load(tmp_path / "b", mode="exact")
    d = DenseModel.from_source(src, dtype=torch.bfloat16)
    x = torch.tensor([IDS])
    a, b = m.forward(x), d.forward(x)
    assert m.dtype == torch.bfloat16 and (a - b).abs().max().item() < 0.1 * b.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.8


def test_compiled_kernel_equals_torch_kernel(bundles):
    """The compiled `c` kernel (built with the machine's C compiler) against the torch ops it replaces:
    the same active count and the same sum, at the tiny model's and at SmolLM2's shape, for 1 and 2
    threads; and decoding with either kernel gives the same logits."""
    from hotcold.runtime import ckernel
    from hotcold.runtime.splitkernel import CKernel, TorchKernel

    if ckernel.load() is None:
        pytest.skip("no C compiler with OpenMP on this machine (the runtime falls back to the torch kernel)")
    ck, tk = CKernel(), TorchKernel()
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for c, D in ((256, 64), (1536, 576)):
            a, rows = torch.randn(c, generator=g), torch.randn(c, D, generator=g)
            t = float(a.abs().median())
            for p in (1, 2):
                torch.set_num_threads(p)
                (y1, m1), (y2, m2) = ck.threshold_down(a, t, rows), tk.threshold_down(a, t, rows)
                assert m1 == m2 == int((a.abs() > t).sum())
                torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    logits = {}
    for name, kernel in (("c", ck), ("torch", tk)):
        m = load(bundles["all_cpu", "product"], mode="threshold", max_len=len(IDS) + 1)
        m.kernel._split = kernel  # the split layout's down-row kernel
        m.prefill(IDS[:1])
        rows = []
        for t in IDS[1:]:
            m.step(t)
            rows.append(m.logits.clone())
        logits[name] = torch.stack(rows)
    torch.testing.assert_close(logits["c"], logits["torch"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["product", "product-bundled"])
def test_product_rule_skips_what_its_thresholds_imply(src, bundles, dense, rule):
    """Decoding a product-rule Bundle in threshold mode computes exactly the cold neurons with
    |act(g)·u| > t_l: the active fraction it reports per layer is the one the dense model's activations
    on the same tokens give under the Bundle's thresholds (about half, at the export's 50% sparsity)."""
    m = load(bundles["all_cpu", rule], mode="threshold")
    g = m.generate(IDS[:5], 10)
    ts = m.bundle.thresholds
    seen: dict[int, float] = {}

    def hook(layer, x, a):
        seen[layer] = float((a[0, 5:].abs() > ts[layer]).float().mean())
        return a

    dense.forward(torch.tensor([IDS[:5] + g.new_ids[:-1]]), hook=hook)
    got = [row["active_fraction"] for row in m.report()["decode"]["layers"]]
    assert got == pytest.approx([seen[l] for l in range(len(got))], abs=0.01)
    assert all(0.3 < f < 0.7 for f in got)  # thresholds applied: unthresholded would be 1.0
