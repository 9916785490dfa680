"""The GPU side's fused Triton kernels (batch-1 decode): few launches, weight streams at HBM rate.

Per layer the dense GPU side is five kernels instead of ~40 small torch ops:

    qkv   = W_qkv · rms_norm(h, attn_norm)              gemv, the norm fused (a scale applied at the end)
    o     = attention(rope(q), rope(k) → cache, v → cache) one program per query head, online softmax
    h    += W_o · o                                      gemv, residual add fused
    a     = silu(g) · u,  [g; u] = hot_gu · rms_norm(h, ffn_norm)   gate and up rows of a slot side by side
    h    += a · hot_down                                 split-K vector-matrix product, atomic adds into h

The norm is fused without a second pass: y_i = r · Σ_k W_ik (h_k w_k) with r = rsqrt(mean(h²) + eps),
and Σ h_k² is accumulated in the same loop that streams W. The head is the same gemv with the final norm.
Each gemv's block shape is chosen once per matrix shape by timing a few candidates on the device (outside
graph capture; scratch outputs, so the engine's state is untouched).

Numerics: fp16 weights, fp32 accumulation and fp32 activations between kernels (the torch path rounds
activations to fp16 between ops; the two agree to fp16 rounding, checked in tests/test_triton.py).
Tests run these kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1) at toy shapes.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch


def available(device: torch.device) -> bool:
    """Triton kernels can run on `device`: CUDA with triton importable, or the interpreter on the CPU."""
    if os.environ.get("HOTCOLD_NO_TRITON", "") not in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(W, X, H, NW, Y, N, K, eps, NORM: tl.constexpr, ACC: tl.constexpr, RELU: tl.constexpr,
             EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Y[n] (+)= act(r · Σ_k W[n, k] x_k); x = X, or h·nw with r = rsqrt(mean(h²) + eps) when NORM
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                if NORM:
                    hv = tl.load(H + cols).to(tl.float32)
                    ss += hv * hv
                    xk = hv * tl.load(NW + cols).to(tl.float32)
                else:
                    xk = tl.load(X + cols).to(tl.float32)
                w = tl.load(W + rows[:, None] * K + cols[None, :], mask=rmask[:, None], other=0.0,
                            eviction_policy="evict_first")
            else:
                cmask = cols < K
                if NORM:
                    hv = tl.load(H + cols, mask=cmask, other=0.0).to(tl.float32)
                    ss += hv * hv
                    xk = hv * tl.load(NW + cols, mask=cmask, other=0.0).to(tl.float32)
                else:
                    xk = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(W + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            y = y / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        if RELU:
            y = tl.maximum(y, 0.0)
        if ACC:
            y += tl.load(Y + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rmask)

    @triton.jit
    def gate_up(W, X, H, NW, A, S, k, D, eps, NORM: tl.constexpr, WRITE_S: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # W [k, 2, D]: slot n's gate row at 2n, up row at 2n + 1. A[n] = silu(g_n) · u_n (S[n] = silu(g_n))
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < k
        accg = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        accu = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < D
            if EVEN_K:
                cmask = cols >= 0
            if NORM:
                hv = tl.load(H + cols, mask=cmask, other=0.0).to(tl.float32)
                ss += hv * hv
                xk = hv * tl.load(NW + cols, mask=cmask, other=0.0).to(tl.float32)
            else:
                xk = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
            m2 = nm[:, None] & cmask[None, :]
            base = W + (2 * n)[:, None] * D + cols[None, :]
            wg = tl.load(base, mask=m2, other=0.0, eviction_policy="evict_first")
            wu = tl.load(base + D, mask=m2, other=0.0, eviction_policy="evict_first")
            accg += wg.to(tl.float32) * xk[None, :]
            accu += wu.to(tl.float32) * xk[None, :]
        g = tl.sum(accg, axis=1)
        u = tl.sum(accu, axis=1)
        if NORM:
            r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
            g = g * r
            u = u * r
        s = g / (1.0 + tl.exp(-g))
        tl.store(A + n, (s * u).to(A.dtype.element_ty), mask=nm)
        if WRITE_S:
            tl.store(S + n, s, mask=nm)

    @triton.jit
    def vecmat_add(A, W, Y, k, D, ROWS_PER, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # Y[d] += Σ_r A[r] W[r, d] over this program's rows (split K), atomically
        pd = tl.program_id(0)
        pr = tl.program_id(1)
        cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        cm = cols < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for i in range(0, ROWS_PER, BLOCK_R):
            rows = pr * ROWS_PER + i + tl.arange(0, BLOCK_R)
            rm = rows < k
            a = tl.load(A + rows, mask=rm, other=0.0).to(tl.float32)
            w = tl.load(W + rows[:, None] * D + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += a[:, None] * w.to(tl.float32)
        tl.atomic_add(Y + cols, tl.sum(acc, axis=0), mask=cm)

    @triton.jit
    def attention(QKV, KC, VC, COS, SIN, POS, O, scale, H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr,
                  MAX_T: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program per query head: rope(q), rope(k_new); the group's first head writes k_new, v_new
        # into the cache at pos; softmax(q·K[:pos+1]) · V[:pos+1], online, the current position from registers
        hq = tl.program_id(0)
        G: tl.constexpr = H // KV
        HALF: tl.constexpr = HD // 2
        kvh = hq // G
        d = tl.arange(0, HALF)
        pos = tl.load(POS)
        c = tl.load(COS + pos * HD + d)
        s = tl.load(SIN + pos * HD + d)
        q1 = tl.load(QKV + hq * HD + d).to(tl.float32)
        q2 = tl.load(QKV + hq * HD + HALF + d).to(tl.float32)
        q1r = q1 * c - q2 * s
        q2r = q2 * c + q1 * s
        kb = H * HD + kvh * HD
        k1 = tl.load(QKV + kb + d).to(tl.float32)
        k2 = tl.load(QKV + kb + HALF + d).to(tl.float32)
        k1r = (k1 * c - k2 * s).to(KC.dtype.element_ty)
        k2r = (k2 * c + k1 * s).to(KC.dtype.element_ty)
        vb = (H + KV) * HD + kvh * HD
        v1 = tl.load(QKV + vb + d).to(VC.dtype.element_ty)
        v2 = tl.load(QKV + vb + HALF + d).to(VC.dtype.element_ty)
        cache = kvh * MAX_T * HD
        if hq % G == 0:
            tl.store(KC + cache + pos * HD + d, k1r)
            tl.store(KC + cache + pos * HD + HALF + d, k2r)
            tl.store(VC + cache + pos * HD + d, v1)
            tl.store(VC + cache + pos * HD + HALF + d, v2)
        m = (tl.sum(q1r * k1r.to(tl.float32), axis=0) + tl.sum(q2r * k2r.to(tl.float32), axis=0)) * scale
        li = m * 0.0 + 1.0
        acc1 = v1.to(tl.float32)
        acc2 = v2.to(tl.float32)
        for t0 in range(0, MAX_T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < pos
            kp = KC + cache + t[:, None] * HD + d[None, :]
            K1 = tl.load(kp, mask=valid[:, None], other=0.0).to(tl.float32)
            K2 = tl.load(kp + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
            sc = (tl.sum(K1 * q1r[None, :], axis=1) + tl.sum(K2 * q2r[None, :], axis=1)) * scale
            sc = tl.where(valid, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new)
            li = li * alpha + tl.sum(p, axis=0)
            vp = VC + cache + t[:, None] * HD + d[None, :]
            V1 = tl.load(vp, mask=valid[:, None], other=0.0).to(tl.float32)
            V2 = tl.load(vp + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
            acc1 = acc1 * alpha + tl.sum(p[:, None] * V1, axis=0)
            acc2 = acc2 * alpha + tl.sum(p[:, None] * V2, axis=0)
            m = m_new
        tl.store(O + hq * HD + d, (acc1 / li).to(O.dtype.element_ty))
        tl.store(O + hq * HD + HALF + d, (acc2 / li).to(O.dtype.element_ty))

    @triton.jit
    def rmsnorm(H, NW, X, D, eps, BLOCK: tl.constexpr):
        # one program: X = H · rsqrt(mean(H²) + eps) · NW (float32 out)
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            hv = tl.load(H + cols, mask=cols < D, other=0.0).to(tl.float32)
            ss += hv * hv
        r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
        for k0 in range(0, D, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            cm = cols < D
            hv = tl.load(H + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(X + cols, hv * r * tl.load(NW + cols, mask=cm, other=0.0).to(tl.float32), mask=cm)

    @triton.jit
    def sample_mask(BANK, POS, R, NFF, P, IDS, OUT, C, BLOCK: tl.constexpr):
        # OUT[j] = u[IDS[j]] < P[IDS[j]] (uint8), u = BANK[pos % R]: a sampled predictor's decision per slot j
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        jm = j < C
        row = tl.load(POS) % R
        i = tl.load(IDS + j, mask=jm, other=0)
        u = tl.load(BANK + row * NFF + i, mask=jm, other=1.0)
        p = tl.load(P + i, mask=jm, other=0.0)
        tl.store(OUT + j, (u < p).to(tl.uint8), mask=jm)

    return {"gemv": gemv, "gate_up": gate_up, "vecmat_add": vecmat_add, "attention": attention,
            "rmsnorm": rmsnorm, "sample_mask": sample_mask, "triton": triton}


# (BLOCK_N, BLOCK_K, num_warps) candidates; the first is used where nothing was timed (CPU interpreter)
GEMV_CONFIGS = ((16, 512, 8), (4, 512, 4), (8, 1024, 8), (32, 256, 8))
VECMAT_CONFIGS = ((16, 512, 4), (32, 256, 4), (8, 1024, 8))
INTERP_GEMV = (16, 64, 4)  # small blocks for the interpreter at toy shapes


class GpuOps:
    """Launches the kernels with per-shape tuned block sizes. One instance per engine."""

    def __init__(self, device: torch.device, tune: bool = True):
        self.k = _kernels()
        self.device = device
        self.interp = device.type != "cuda"
        self.tune = tune and not self.interp
        self.best: dict[tuple, tuple] = {}
        self.tuning_log: list[dict[str, Any]] = []

    # ---- tuning ------------------------------------------------------------------------------
    def _pick(self, key: tuple, configs, launch) -> tuple:
        """The fastest config for `key` (timed once outside capture), else the first."""
        if key in self.best:
            return self.best[key]
        if self.interp:
            return INTERP_GEMV if key[0] != "vecmat" else (8, 64, 4)
        if not self.tune or torch.cuda.is_current_stream_capturing():
            return configs[0]
        times = {}
        for cfg in configs:
            try:
                times[cfg] = self._time(cfg, launch)
            except Exception:  # noqa: BLE001 - a config that does not compile is skipped
                continue
        best = min(times, key=times.get) if times else configs[0]
        self.best[key] = best
        self.tuning_log.append({"op": key[0], "shape": list(key[1:]), "config": list(best),
                                "ms": {str(list(c)): t for c, t in times.items()}})
        return best

    def _time(self, cfg: tuple, launch, reps: int = 10) -> float:
        """ms per launch of `cfg`, as the engine runs it: replayed from a CUDA graph. Launched one by one
        from Python, a kernel of a few microseconds is timed at the launcher's pace, not the GPU's, and the
        fastest config on the GPU can lose the pick; without graphs (a failed capture) the plain launches."""
        launch(cfg, scratch=True)  # compiles
        torch.cuda.synchronize(self.device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                for _ in range(reps):
                    launch(cfg, scratch=True)
            g.replay()
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            del g
            return a.elapsed_time(b) / reps
        except RuntimeError:
            torch.cuda.synchronize(self.device)
        a.record()
        for _ in range(reps):
            launch(cfg, scratch=True)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps

    # ---- ops ---------------------------------------------------------------------------------
    def gemv(self, w: torch.Tensor, out: torch.Tensor, *, x: torch.Tensor | None = None,
             h: torch.Tensor | None = None, nw: torch.Tensor | None = None, eps: float = 0.0,
             acc: bool = False, relu: bool = False) -> None:
        """out (+)= act(w · x), or w · rms_norm(h, nw) when h is given (w [N, K] contiguous)."""
        N, K = w.shape
        norm = h is not None
        xa = h if norm else x
        nwa = nw if norm else xa

        def launch(cfg, scratch=False):
            bn, bk, nwarps = cfg
            y = torch.empty_like(out) if scratch else out
            self.k["gemv"][(self.k["triton"].cdiv(N, bn),)](
                w, xa, xa, nwa, y, N, K, eps, NORM=norm, ACC=acc, RELU=relu, EVEN_K=(K % bk == 0),
                BLOCK_N=bn, BLOCK_K=bk, num_warps=nwarps)

        launch(self._pick(("gemv", N, K, norm, str(w.dtype)), GEMV_CONFIGS, launch))

    def gate_up(self, w: torch.Tensor, a_out: torch.Tensor, *, x: torch.Tensor | None = None,
                h: torch.Tensor | None = None, nw: torch.Tensor | None = None, eps: float = 0.0,
                s_out: torch.Tensor | None = None) -> None:
        """a_out = silu(g)·u for the hot slots of w [k, 2, D] (s_out = silu(g) when given)."""
        k, _, D = w.shape
        if k == 0:
            return
        norm = h is not None
        xa = h if norm else x
        nwa = nw if norm else xa
        s = s_out if s_out is not None else a_out

        def launch(cfg, scratch=False):
            bn, bk, nwarps = cfg
            bn = max(1, bn // 2)  # two rows per slot
            y = torch.empty_like(a_out) if scratch else a_out
            ys = torch.empty_like(s) if scratch else s
            self.k["gate_up"][(self.k["triton"].cdiv(k, bn),)](
                w, xa, xa, nwa, y, ys, k, D, eps, NORM=norm, WRITE_S=s_out is not None, EVEN_K=(D % bk == 0),
                BLOCK_N=bn, BLOCK_K=bk, num_warps=nwarps)

        launch(self._pick(("gate_up", k, D, norm, str(w.dtype)), GEMV_CONFIGS, launch))

    def vecmat_add(self, a: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        """y [D] float32 += a [k] · w [k, D]."""
        k, D = w.shape
        if k == 0:
            return
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if not self.interp else 4

        def launch(cfg, scratch=False):
            br, bd, nwarps = cfg
            nd = self.k["triton"].cdiv(D, bd)
            splits = max(1, min(self.k["triton"].cdiv(k, br), (4 * sms + nd - 1) // nd))
            rows_per = self.k["triton"].cdiv(self.k["triton"].cdiv(k, splits), br) * br
            splits = self.k["triton"].cdiv(k, rows_per)
            yy = torch.zeros_like(y) if scratch else y
            self.k["vecmat_add"][(nd, splits)](a, w, yy, k, D, ROWS_PER=rows_per, BLOCK_R=br, BLOCK_D=bd,
                                               num_warps=nwarps)

        launch(self._pick(("vecmat", k, D, str(w.dtype)), VECMAT_CONFIGS, launch))

    def attention(self, qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, pos: torch.Tensor, out: torch.Tensor, n_heads: int) -> None:
        KV, T, Hd = kc.shape
        bt = min(64, T)
        self.k["attention"][(n_heads,)](qkv, kc, vc, cos, sin, pos, out, 1.0 / math.sqrt(Hd), H=n_heads, KV=KV,
                                        HD=Hd, MAX_T=T, BLOCK_T=bt, num_warps=4)

    def rmsnorm(self, h: torch.Tensor, nw: torch.Tensor, eps: float, out: torch.Tensor) -> None:
        D = h.shape[0]
        self.k["rmsnorm"][(1,)](h, nw, out, D, eps, BLOCK=min(1024, 1 << (D - 1).bit_length()), num_warps=8)

    def sample_mask(self, bank: torch.Tensor, pos: torch.Tensor, p: torch.Tensor, ids: torch.Tensor,
                    out: torch.Tensor) -> None:
        """out[j] = bank[pos % R, ids[j]] < p[ids[j]] as uint8 (bank [R, n_ff] float32, p [n_ff])."""
        C = ids.shape[0]
        if C == 0:
            return
        R, nff = bank.shape
        self.k["sample_mask"][(self.k["triton"].cdiv(C, 1024),)](bank, pos, R, nff, p, ids, out, C, BLOCK=1024,
                                                                 num_warps=4)
