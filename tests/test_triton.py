"""The GPU side's Triton kernels (hotcold.runtime.triton_ops) against torch, and the engine built on them.

Runs on a CUDA machine, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in the environment);
skipped where neither is possible (CI has no triton)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hotcold.runtime import triton_ops

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_ops.available(DEV),
                                reason="triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on a CPU)")
IDS = [1, 5, 9, 22, 7, 100, 3, 64]


@pytest.fixture(scope="module")
def ops():
    return triton_ops.GpuOps(DEV)


def _r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * scale).to(DEV, dtype)


def _close(a, b, tol=2e-3):
    return float((a.float() - b.float()).norm() / max(float(b.float().norm()), 1e-12)) < tol


def _rms(h, w, eps):
    return h * torch.rsqrt(h.square().mean() + eps) * w.float()


@pytest.mark.parametrize("N,K", [(48, 128), (37, 100)])
def test_gemv_variants(ops, N, K):
    w, x, h = _r(N, K, dtype=torch.float16), _r(K), _r(K)
    nw = 1 + _r(K, dtype=torch.float16, scale=0.1)
    y = torch.zeros(N, device=DEV)
    ops.gemv(w, y, x=x)
    assert _close(y, w.float() @ x)
    y = torch.zeros(N, device=DEV)
    ops.gemv(w, y, h=h, nw=nw, eps=1e-5)
    assert _close(y, w.float() @ _rms(h, nw, 1e-5))
    y0 = _r(N)
    y = y0.clone()
    ops.gemv(w, y, x=x, acc=True, relu=True)
    assert _close(y, y0 + (w.float() @ x).clamp(min=0))


def test_gate_up_and_vecmat(ops):
    k, D = 21, 128
    gu, h = _r(k, 2, D, dtype=torch.float16), _r(D)
    nw = 1 + _r(D, dtype=torch.float16, scale=0.1)
    a, s = torch.zeros(k, device=DEV), torch.zeros(k, device=DEV)
    ops.gate_up(gu, a, h=h, nw=nw, eps=1e-5, s_out=s)
    xn = _rms(h, nw, 1e-5)
    g, u = gu[:, 0].float() @ xn, gu[:, 1].float() @ xn
    assert _close(a, F.silu(g) * u) and _close(s, F.silu(g))
    wd, y0 = _r(k, D, dtype=torch.float16), _r(D)
    y = y0.clone()
    ops.vecmat_add(a, wd, y)
    assert _close(y, y0 + a @ wd.float())


@pytest.mark.parametrize("pos", [0, 5, 31])
def test_attention_rope_and_cache(ops, pos):
    H, KV, Hd, T = 8, 2, 16, 32
    qkv = _r((H + 2 * KV) * Hd)
    kc, vc = _r(KV, T, Hd, dtype=torch.float16), _r(KV, T, Hd, dtype=torch.float16)
    t = torch.arange(T, dtype=torch.float64)
    f = torch.outer(t, 1.0 / (10000 ** (torch.arange(0, Hd, 2, dtype=torch.float64) / Hd)))
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().float().to(DEV), emb.sin().float().to(DEV)
    out = torch.zeros(H * Hd, device=DEV)
    kc2, vc2 = kc.clone(), vc.clone()
    ops.attention(qkv, kc2, vc2, cos, sin, torch.tensor([pos], device=DEV), out, H)

    def rope(x):
        half = Hd // 2
        return x * cos[pos] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[pos]

    q, k, v = qkv.split([H * Hd, KV * Hd, KV * Hd])
    kr, vr = kc.clone(), vc.clone()
    kr[:, pos], vr[:, pos] = rope(k.view(KV, Hd)).half(), v.view(KV, Hd).half()
    G = H // KV
    sc = torch.einsum("kgd,ktd->kgt", rope(q.view(H, Hd)).view(KV, G, Hd), kr[:, :pos + 1].float()) / math.sqrt(Hd)
    want = torch.einsum("kgt,ktd->kgd", sc.softmax(-1), vr[:, :pos + 1].float()).reshape(-1)
    assert _close(out, want, 1e-4)
    assert torch.equal(kc2, kr) and torch.equal(vc2, vr)


# ---- the engine on these kernels -----------------------------------------------------------------
@pytest.fixture(scope="module")
def src():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def ref(src):
    from hotcold.model.dense import DenseModel

    return DenseModel.from_source(src, max_len=64).forward(torch.tensor([IDS]))[0]


def _decode(eng, ids):
    out = []
    for t in ids:
        eng.step(t)
        out.append(eng.logits.clone().cpu())
    return torch.stack(out)


@pytest.mark.parametrize("sizes", [(256, 256, 256, 256), (10, 128, 256, 0)], ids=["all-gpu", "split"])
def test_engine_triton_equals_dense(src, ref, sizes):
    from hotcold.runtime.build import from_source

    rng = np.random.default_rng(0)
    hot = [rng.permutation(src.config.n_ff)[:k] for k in sizes]
    eng = from_source(src, hot, cold_mode="exact", max_len=64, device=DEV, gpu_kernels="triton", cpu_backend="torch")
    assert eng.gpu_kernels == "triton"
    out = _decode(eng, IDS)
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3), (out - ref).abs().max()


def test_engine_triton_migration_keeps_exact_output(src, ref):
    from hotcold.runtime.build import from_source
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    cfg = src.config
    rng = np.random.default_rng(0)
    hot = [rng.permutation(cfg.n_ff)[:k] for k in (10, 50, 200, 100)]
    eng = from_source(src, hot, cold_mode="exact", max_len=64, device=DEV, gpu_kernels="triton",
                      cpu_backend="torch", stat_thresholds=[0.3] * cfg.n_layers)
    cm = CostModel(cfg, preset("h200"), "float32", cold_mode="threshold", ctx_len=64)
    prior = np.zeros((cfg.n_layers, cfg.n_ff))
    for l in range(cfg.n_layers):
        prior[l][hot[l]] = 1.0
    dyn = DynamicPlacement(eng, cm, prior, every=2, alpha=0.9, max_swaps=16, horizon=10**6, margin=0.0)
    out = _decode(eng, IDS)
    dyn.flush()
    assert dyn.stats.neurons > 20
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3), (out - ref).abs().max()


def test_sampled_predictor_fused_mask_equals_torch(src):
    """fill_cold_mask through the Triton kernels draws the same decisions as the torch path."""
    from hotcold.runtime.build import from_source
    from hotcold.runtime.selectors import SampledPredictor

    cfg = src.config
    f = np.random.default_rng(1).random((cfg.n_layers, cfg.n_ff)) ** 3
    hot = [np.argsort(-f[l])[:64] for l in range(cfg.n_layers)]
    engs = []
    for kern in ("triton", "torch"):
        sel = SampledPredictor(f, cfg.dim, 8, DEV, torch.float32, bank_rows=16, seed=3)
        e = from_source(src, hot, cold_mode="predictor", selector=sel, max_len=64, device=DEV, gpu_kernels=kern,
                        cpu_backend="torch")
        e.step(1)
        for _ in range(5):
            e.step(None)
        engs.append(e)
    assert engs[0].totals.cold_active == engs[1].totals.cold_active > 0
    assert torch.allclose(engs[0].logits.cpu(), engs[1].logits.cpu(), atol=1e-3, rtol=1e-3)
