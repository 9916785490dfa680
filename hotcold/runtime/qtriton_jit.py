"""The Triton kernels of hotcold.runtime.qtriton (see its docstring), at module level.

Triton resolves a kernel's calls to other @triton.jit functions through the module's globals, so the
shared tile helpers and the kernels live here; this module imports triton at import time and is only
imported by qtriton when the kernels are first needed.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(P, P16, rows, rmask, k0, K, RB, BITS: tl.constexpr, ASYM: tl.constexpr, GS: tl.constexpr,
          NGB: tl.constexpr):
    """Codes of a [BLOCK_N, NGB groups, 2 runs of GS/2] tile as float32 (lo, hi: [BN, NGB, GS/2]), the
    groups' scales d and offsets o [BN, NGB], and the group mask [NGB]."""
    H: tl.constexpr = GS // 2
    gl = tl.arange(0, NGB)
    i = tl.arange(0, H)
    gmask = (k0 + gl * GS) < K
    m3 = rmask[:, None, None] & gmask[None, :, None]
    rb = rows[:, None, None] * RB
    if BITS == 4:
        b = tl.load(P + rb + (k0 // 2 + gl * H)[None, :, None] + i[None, None, :], mask=m3, other=0,
                    eviction_policy="evict_first")
        lo = (b & 15).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
    else:
        off = rb + (k0 + gl * GS)[None, :, None] + i[None, None, :]
        lo = tl.load(P + off, mask=m3, other=0, eviction_policy="evict_first").to(tl.float32)
        hi = tl.load(P + off + H, mask=m3, other=0, eviction_policy="evict_first").to(tl.float32)
    m2 = rmask[:, None] & gmask[None, :]
    sidx = rows[:, None] * (RB // 2) + (K * BITS // 16 + k0 // GS + gl)[None, :]
    d = tl.load(P16 + sidx, mask=m2, other=0.0).to(tl.float32)
    if ASYM:
        o = tl.load(P16 + sidx + K // GS, mask=m2, other=0.0).to(tl.float32)
    elif BITS == 4:
        o = d * -8.0
    else:
        o = d * 0.0
    return lo, hi, d, o, gmask

@triton.jit
def _xtile(X, H_, NW, k0, K, NORM: tl.constexpr, GS: tl.constexpr, NGB: tl.constexpr):
    """The two runs of x matching a tile's groups ([NGB, GS/2] each), and their squares' sum (NORM)."""
    H: tl.constexpr = GS // 2
    gl = tl.arange(0, NGB)
    i = tl.arange(0, H)
    cols = (k0 + gl * GS)[:, None] + i[None, :]
    cm = ((k0 + gl * GS) < K)[:, None] & (i[None, :] >= 0)
    if NORM:
        ha = tl.load(H_ + cols, mask=cm, other=0.0).to(tl.float32)
        hb = tl.load(H_ + cols + H, mask=cm, other=0.0).to(tl.float32)
        ss = tl.sum(tl.sum(ha * ha + hb * hb, axis=1), axis=0)
        xa = ha * tl.load(NW + cols, mask=cm, other=0.0).to(tl.float32)
        xb = hb * tl.load(NW + cols + H, mask=cm, other=0.0).to(tl.float32)
    else:
        xa = tl.load(X + cols, mask=cm, other=0.0).to(tl.float32)
        xb = tl.load(X + cols + H, mask=cm, other=0.0).to(tl.float32)
        ss = 0.0
    return xa, xb, ss

@triton.jit
def qgemv(P, P16, X, H_, NW, Y, N, K, RB, K_PER, eps, NORM: tl.constexpr, ACC: tl.constexpr,
          RELU: tl.constexpr, SPLIT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr, GS: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EW: tl.constexpr = False):
    # Y[n] (+)= act(r · Σ_k W[n, k] x_k) over this program's K range [pid_k·K_PER, +K_PER).
    # EW: accumulate element-wise ([BN, NGB, GS/2] partial sums, reduced once at the end) instead of
    # reducing each tile's groups in the loop (fewer shuffles per byte; more registers)
    NGB: tl.constexpr = BLOCK_K // GS
    H: tl.constexpr = GS // 2
    pid = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N, NGB), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, NGB if EW else 1, H if EW else 1), dtype=tl.float32)
    ss = 0.0
    kbeg = pk * K_PER
    for kk in range(0, K_PER, BLOCK_K):
        k0 = kbeg + kk
        lo, hi, d, o, gmask = _tile(P, P16, rows, rmask, k0, K, RB, BITS, ASYM, GS, NGB)
        xa, xb, s2 = _xtile(X, H_, NW, k0, K, NORM, GS, NGB)
        ss += s2
        if EW:
            acc3 += d[:, :, None] * (lo * xa[None, :, :] + hi * xb[None, :, :]) + o[:, :, None] * (xa + xb)[None, :, :]
        else:
            qx = tl.sum(lo * xa[None, :, :] + hi * xb[None, :, :], axis=2)  # [BN, NGB]: Σ q_i x_i per group
            xs = tl.sum(xa + xb, axis=1)  # [NGB]: Σ x_i per group
            acc += d * qx + o * xs[None, :]
    if EW:
        y = tl.sum(tl.sum(acc3, axis=2), axis=1)
    else:
        y = tl.sum(acc, axis=1)
    if NORM:
        y = y / tl.sqrt(ss / K + eps)
    if RELU:
        y = tl.maximum(y, 0.0)
    if SPLIT:
        tl.atomic_add(Y + rows, y, mask=rmask)
    else:
        if ACC:
            y += tl.load(Y + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rmask)

@triton.jit
def qgate_up(P, P16, X, H_, NW, A, S, k, D, RB, eps, NORM: tl.constexpr, WRITE_S: tl.constexpr,
             BITS: tl.constexpr, ASYM: tl.constexpr, GS: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EW: tl.constexpr = False):
    # W [2k, D]: slot n's gate row at 2n, up row at 2n + 1. A[n] = silu(g_n) · u_n (S[n] = silu(g_n));
    # EW as in qgemv
    NGB: tl.constexpr = BLOCK_K // GS
    H: tl.constexpr = GS // 2
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < k
    accg = tl.zeros((BLOCK_N, NGB), dtype=tl.float32)
    accu = tl.zeros((BLOCK_N, NGB), dtype=tl.float32)
    accg3 = tl.zeros((BLOCK_N, NGB if EW else 1, H if EW else 1), dtype=tl.float32)
    accu3 = tl.zeros((BLOCK_N, NGB if EW else 1, H if EW else 1), dtype=tl.float32)
    ss = 0.0
    for k0 in range(0, D, BLOCK_K):
        xa, xb, s2 = _xtile(X, H_, NW, k0, D, NORM, GS, NGB)
        ss += s2
        if EW:
            xab = (xa + xb)[None, :, :]
            lo, hi, d, o, gmask = _tile(P, P16, 2 * n, nm, k0, D, RB, BITS, ASYM, GS, NGB)
            accg3 += d[:, :, None] * (lo * xa[None, :, :] + hi * xb[None, :, :]) + o[:, :, None] * xab
            lo, hi, d, o, gmask = _tile(P, P16, 2 * n + 1, nm, k0, D, RB, BITS, ASYM, GS, NGB)
            accu3 += d[:, :, None] * (lo * xa[None, :, :] + hi * xb[None, :, :]) + o[:, :, None] * xab
        else:
            xs = tl.sum(xa + xb, axis=1)
            lo, hi, d, o, gmask = _tile(P, P16, 2 * n, nm, k0, D, RB, BITS, ASYM, GS, NGB)
            accg += d * tl.sum(lo * xa[None, :, :] + hi * xb[None, :, :], axis=2) + o * xs[None, :]
            lo, hi, d, o, gmask = _tile(P, P16, 2 * n + 1, nm, k0, D, RB, BITS, ASYM, GS, NGB)
            accu += d * tl.sum(lo * xa[None, :, :] + hi * xb[None, :, :], axis=2) + o * xs[None, :]
    if EW:
        g = tl.sum(tl.sum(accg3, axis=2), axis=1)
        u = tl.sum(tl.sum(accu3, axis=2), axis=1)
    else:
        g = tl.sum(accg, axis=1)
        u = tl.sum(accu, axis=1)
    if NORM:
        r = 1.0 / tl.sqrt(ss / D + eps)
        g = g * r
        u = u * r
    s = g / (1.0 + tl.exp(-g))
    tl.store(A + n, (s * u).to(A.dtype.element_ty), mask=nm)
    if WRITE_S:
        tl.store(S + n, s, mask=nm)

@triton.jit
def qvecmat_add(A, P, P16, Y, k, D, RB, ROWS_PER, BITS: tl.constexpr, ASYM: tl.constexpr, GS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Y[d] += Σ_r A[r] W[r, d] over this program's rows (split K) and D tile, atomically
    NGB: tl.constexpr = BLOCK_D // GS
    H: tl.constexpr = GS // 2
    pd = tl.program_id(0)
    pr = tl.program_id(1)
    d0 = pd * BLOCK_D
    acc_lo = tl.zeros((BLOCK_R, NGB, H), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_R, NGB, H), dtype=tl.float32)
    for r0 in range(0, ROWS_PER, BLOCK_R):
        rows = pr * ROWS_PER + r0 + tl.arange(0, BLOCK_R)
        rm = rows < k
        a = tl.load(A + rows, mask=rm, other=0.0).to(tl.float32)
        lo, hi, d, o, gmask = _tile(P, P16, rows, rm, d0, D, RB, BITS, ASYM, GS, NGB)
        c = (a[:, None] * d)[:, :, None]
        oo = (a[:, None] * o)[:, :, None]
        acc_lo += c * lo + oo
        acc_hi += c * hi + oo
    gl = tl.arange(0, NGB)
    i = tl.arange(0, H)
    cols = (d0 + gl * GS)[:, None] + i[None, :]
    cm = ((d0 + gl * GS) < D)[:, None] & (i[None, :] >= 0)
    tl.atomic_add(Y + cols, tl.sum(acc_lo, axis=0), mask=cm)
    tl.atomic_add(Y + cols + H, tl.sum(acc_hi, axis=0), mask=cm)
