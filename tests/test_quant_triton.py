"""The quantized Triton kernels (hotcold.runtime.qtriton) against torch on the dequantized weights.

Runs on a CUDA machine, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in the environment);
skipped where neither is possible (CI has no triton)."""

from __future__ import annotations

import pytest
import torch

from hotcold import quant
from hotcold.quant import QFormat
from hotcold.runtime import triton_ops

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_ops.available(DEV),
                                reason="triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on a CPU)")
FORMATS = [QFormat(4), QFormat(8), QFormat(4, 32, True), QFormat(8, 64, True), QFormat(4, 16)]


@pytest.fixture(scope="module")
def ops():
    from hotcold.runtime.qtriton import QGpuOps

    return QGpuOps(DEV)


def _r(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * scale


def _q(rows, cols, fmt, seed=0):
    return quant.quantize(_r(rows, cols, seed=seed, scale=0.3), fmt.bits, fmt.group, fmt.asym).to(DEV)


def _close(a, b, tol=1e-5):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-12)) < tol


def _rms(h, w, eps):
    return h * torch.rsqrt(h.square().mean() + eps) * w.float()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_qgemv(ops, fmt):
    N, K = 37, 192  # K: 6 groups of 32, so the last K tile is partly masked
    w = _q(N, K, fmt)
    wd = quant.dequantize(w.to("cpu")).double()
    x, h = _r(K, seed=1), _r(K, seed=2)
    nw = 1 + _r(K, seed=3, scale=0.1)
    y = torch.zeros(N, device=DEV)
    ops.qgemv(w, y, x=x.to(DEV), split=1)
    assert _close(y, wd @ x.double())
    for split in (2, 3, None):  # split-K with atomic adds (None: the launcher's choice)
        y = torch.zeros(N, device=DEV)
        ops.qgemv(w, y, x=x.to(DEV), split=split)
        assert _close(y, wd @ x.double())
    y = torch.zeros(N, device=DEV)
    ops.qgemv(w, y, h=h.to(DEV), nw=nw.to(DEV), eps=1e-5)
    assert _close(y, wd @ _rms(h.double(), nw.double(), 1e-5))
    y0 = _r(N, seed=4)
    y = y0.clone().to(DEV)
    ops.qgemv(w, y, x=x.to(DEV), acc=True, relu=True)
    assert _close(y, y0.double() + (wd @ x.double()).clamp(min=0))
    y = y0.clone().to(DEV)
    ops.qgemv(w, y, x=x.to(DEV), acc=True, split=2)
    assert _close(y, y0.double() + wd @ x.double())


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.name)
def test_qgate_up_and_qvecmat(ops, fmt):
    k, D = 11, 128
    gu = _q(2 * k, D, fmt, seed=5)  # rows 2n, 2n + 1: slot n's gate and up rows
    gud = quant.dequantize(gu.to("cpu")).double()
    h = _r(D, seed=6)
    nw = 1 + _r(D, seed=7, scale=0.1)
    a, s = torch.zeros(k, device=DEV), torch.zeros(k, device=DEV)
    ops.qgate_up(gu, a, h=h.to(DEV), nw=nw.to(DEV), eps=1e-5, s_out=s)
    xn = _rms(h.double(), nw.double(), 1e-5)
    g, u = gud[0::2] @ xn, gud[1::2] @ xn
    sg = torch.nn.functional.silu(g)
    assert _close(s, sg) and _close(a, sg * u)
    x = _r(D, seed=8)
    ops.qgate_up(gu, a, x=x.to(DEV))
    assert _close(a, torch.nn.functional.silu(gud[0::2] @ x.double()) * (gud[1::2] @ x.double()))

    rows = 70  # more rows than one program's share: the row split adds atomically
    down = _q(rows, D, fmt, seed=9)
    coef = _r(rows, seed=10)
    y0 = _r(D, seed=11)
    y = y0.clone().to(DEV)
    ops.qvecmat_add(coef.to(DEV), down, y)
    assert _close(y, y0.double() + coef.double() @ quant.dequantize(down.to("cpu")).double())


def test_non_power_of_two_groups_are_refused(ops):
    from hotcold.errors import InputError

    w = _q(4, 96, QFormat(4, 48))
    with pytest.raises(InputError, match="power-of-two"):
        ops.qgemv(w, torch.zeros(4, device=DEV), x=torch.zeros(96, device=DEV))


# ---- the model on the quantized Triton ops (the CUDA decode path; the interpreter on a CPU) ----------
def test_engine_qtriton_equals_torch_path():
    """A q4 model's decode steps through QGpuOps (qgemv attention and head, qgate_up + qvecmat_add hot
    part, the fused attention over a float16 KV cache) give the plain-torch path's logits."""
    import numpy as np

    from hotcold.model.registry import load_source
    from hotcold.runtime.build import from_source

    src = load_source("random:tiny")
    rng = np.random.default_rng(0)
    # layers with a few, many, all and no hot neurons (all-hot layers skip the CPU exchange); 3 tokens
    # keep it to ~1.5 min in the interpreter on a 2-core machine
    hot = [rng.permutation(src.config.n_ff)[:k] for k in (10, 128, 256, 0)]
    ids = [1, 17, 200]
    out = {}
    for kern in ("triton", "torch"):
        eng = from_source(src, hot, quant="q4", cold_mode="exact", max_len=16, device=DEV, gpu_kernels=kern,
                          cpu_backend="torch")
        assert eng.gpu_kernels == kern and eng.quantized
        steps = []
        for t in ids:
            eng.step(t)
            steps.append(eng.logits.clone().cpu())
        out[kern] = torch.stack(steps)
    assert torch.allclose(out["triton"], out["torch"], atol=1e-3, rtol=1e-3), (out["triton"] - out["torch"]).abs().max()
