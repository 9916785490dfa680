"""The CPU side's cold-neuron kernel over quantized rows (hotcold.quant's format), numba-compiled.

The same kernel as hotcold.runtime.coldkernel's fp16/fp32 one, on INT4/INT8 rows: per layer, cold slot j has
    gate    QTensor [C, D]     its gate row
    up_down QTensor [C, 2D]    its up row followed by its down column, groups along D (hcat of the two)
and for x [D] float32, with s = silu(gate_j · x), the layer's CPU partial sum is
    y = Σ_active s · (up_j · x) · down_j                      [D] float32
    exact       every slot is active
    threshold   rule `gate`: active iff |s| > t (gate rows of every slot are read; up/down rows only for active
                ones); rule `product`: active iff |s·(up_j · x)| > t (gate and up rows of every slot are read,
                the down column only for active ones)
    predictor   the slots whose `mask` byte is set; no other row is read

Same shape as the fp16 kernel, so it slots into the same caller: `group` G ∈ {1, 2, 4} neurons streamed
side by side per thread (G rows' bytes in flight per core, one read-modify-write of the accumulator per
value for all G down columns), and a `dynamic` schedule (threads grab CHUNK slots from an atomic
counter) in threshold and predictor mode; exact mode is static and reproducible to the bit.

Arithmetic: a group of g values with scale d and offset o (o = −8d for symmetric INT4, 0 for symmetric
INT8, m for asymmetric) contributes d·Σ q_i x_i + o·Σ x_i to a dot product, so codes are widened to
float32 and multiplied with x directly (Σ x_i per group is computed once per call); the down column adds
(a·d)·q_i + a·o per value. Everything accumulates in float32. An INT4 byte holds values i and i + g/2 of
its group (hotcold/quant.py), so a byte run unpacks into two runs of consecutive values: the inner loops
are contiguous and LLVM vectorises them (no shuffles).

Predictor mode over symmetric INT4 rows of group 32 runs hotcold.runtime.cq4's AVX-512 C kernel instead where
it builds (the numba kernel otherwise; HOTCOLD_Q4_KERNEL=numba forces it).

`QColdKernel` mirrors `ColdKernel`: call it with the QTensors, it returns a `ColdResult` whose
`bytes_read` counts quantized bytes (scales included). Without numba it falls back to dequantizing the
rows it needs with torch (the same results to float32 rounding; slow, for small shapes and CI).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from hotcold.runtime.coldkernel import MODES, ColdResult, default_dynamic, fetch_add, resolve_backend
from hotcold.errors import InputError
from hotcold.quant import QFormat, QTensor, dequantize

_MODE_ID = {"exact": 0, "threshold": 1, "predictor": 2, "product": 3}
QGROUPS = (1, 2, 4)
CHUNK = 64  # slots per grab of the dynamic schedule, as in the fp16 kernel


def default_qgroup() -> int:
    """4 neurons side by side, the fp16 kernel's default (its HOTCOLD_COLD_GROUP is honoured up to 4)."""
    from hotcold.runtime.coldkernel import default_group

    return min(4, default_group())


@lru_cache(maxsize=None)
def _numba_qkernel(bits: int, asym: bool, group: int) -> Any:
    """Compile the kernel for one format (bits, asym, quantization group).

    The neuron group G and the schedule are arguments, not compile-time constants: one compilation per
    format (each takes 30-60 s on a loaded 2-core machine), and the branches they steer run once per
    group of G neurons, not per value."""
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    @intrinsic
    def _h2f(typingctx, v):  # uint16 holding fp16 bits -> float32
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return sig, codegen

    # codes to float32 in LLVM IR: numba would widen a uint8 to int64 first, and int64 -> float has no
    # packed instruction before AVX-512, so the unpacking loops would stay scalar
    def _code_intrinsic(op):
        @intrinsic
        def conv(typingctx, v):
            sig = types.float32(v)

            def codegen(context, builder, signature, args):
                return op(builder, args[0])

            return sig, codegen

        return conv

    i8 = ir.IntType(8)
    _lo4 = _code_intrinsic(lambda b, v: b.uitofp(b.and_(v, ir.Constant(i8, 15)), ir.FloatType()))
    _hi4 = _code_intrinsic(lambda b, v: b.uitofp(b.lshr(v, ir.Constant(i8, 4)), ir.FloatType()))
    _u8 = _code_intrinsic(lambda b, v: b.uitofp(v, ir.FloatType()))
    _s8 = _code_intrinsic(lambda b, v: b.sitofp(v, ir.FloatType()))
    SIGNED8 = bits == 8 and not asym

    _fetch_add = fetch_add()
    FM = {"reassoc", "contract", "arcp", "nsz"}  # no 'ninf': exp(-g) may overflow to inf
    GS = group  # values per scale
    H = group // 2  # a group is two runs of H values: byte i of a run pair gives values i and H + i
    GB = H if bits == 4 else group  # data bytes per group
    SYM4 = bits == 4 and not asym
    ASYM = asym
    F0 = np.float32(0.0)

    @njit(inline="always")
    def lohi(p, j, bo, i):
        """Codes of values i and H + i of the group whose data starts at byte bo of row j, as float32."""
        if bits == 4:
            b = p[j, bo + i]
            return _lo4(b), _hi4(b)
        if SIGNED8:
            return _s8(p[j, bo + i]), _s8(p[j, bo + H + i])
        return _u8(p[j, bo + i]), _u8(p[j, bo + H + i])

    @njit(inline="always")
    def scale_off(q16, j, gi, sb, ob):
        """(d, o) of group gi: scale at uint16 index sb + gi of row j, offset per the format."""
        d = _h2f(q16[j, sb + gi])
        if ASYM:
            return d, _h2f(q16[j, ob + gi])
        if SYM4:
            return d, np.float32(-8.0) * d
        return d, F0

    @njit(inline="always", fastmath=FM)
    def silu(g):
        return g / (np.float32(1.0) + np.exp(-g))

    # ---- dot products of 1, 2 or 4 rows with x (db: first data byte, sb/ob: first scale/offset index)
    @njit(fastmath=FM, nogil=True)
    def qdot1(p, q16, j0, x, xs, ng, db, sb, ob):
        t0 = F0
        for gi in range(ng):
            xo = gi * GS
            bo = db + gi * GB
            s0 = F0
            for i in range(H):
                a0, b0 = lohi(p, j0, bo, i)
                s0 += a0 * x[xo + i] + b0 * x[xo + H + i]
            d0, o0 = scale_off(q16, j0, gi, sb, ob)
            t0 += d0 * s0 + o0 * xs[gi]
        return t0

    # qdot2 / qdot4 keep per-lane partial sums (acc2/acc4 [rows x H]) across the groups and reduce once
    # per row: the per-group horizontal sum was the kernel's bottleneck (x1.3-1.4 single-threaded)
    @njit(fastmath=FM, nogil=True)
    def qdot2(p, q16, j0, j1, x, xs, ng, db, sb, ob):
        acc = np.zeros(2 * H, np.float32)
        t0 = F0
        t1 = F0
        for gi in range(ng):
            xo = gi * GS
            bo = db + gi * GB
            xg = xs[gi]
            d0, o0 = scale_off(q16, j0, gi, sb, ob)
            d1, o1 = scale_off(q16, j1, gi, sb, ob)
            for i in range(H):
                xa = x[xo + i]
                xb = x[xo + H + i]
                a0, b0 = lohi(p, j0, bo, i)
                a1, b1 = lohi(p, j1, bo, i)
                acc[i] += d0 * (a0 * xa + b0 * xb)
                acc[H + i] += d1 * (a1 * xa + b1 * xb)
            t0 += o0 * xg
            t1 += o1 * xg
        for i in range(H):
            t0 += acc[i]
            t1 += acc[H + i]
        return t0, t1

    @njit(fastmath=FM, nogil=True)
    def qdot4(p, q16, j0, j1, j2, j3, x, xs, ng, db, sb, ob):
        acc = np.zeros(4 * H, np.float32)
        t0 = F0
        t1 = F0
        t2 = F0
        t3 = F0
        for gi in range(ng):
            xo = gi * GS
            bo = db + gi * GB
            xg = xs[gi]
            d0, o0 = scale_off(q16, j0, gi, sb, ob)
            d1, o1 = scale_off(q16, j1, gi, sb, ob)
            d2, o2 = scale_off(q16, j2, gi, sb, ob)
            d3, o3 = scale_off(q16, j3, gi, sb, ob)
            for i in range(H):
                xa = x[xo + i]
                xb = x[xo + H + i]
                a0, b0 = lohi(p, j0, bo, i)
                a1, b1 = lohi(p, j1, bo, i)
                a2, b2 = lohi(p, j2, bo, i)
                a3, b3 = lohi(p, j3, bo, i)
                acc[i] += d0 * (a0 * xa + b0 * xb)
                acc[H + i] += d1 * (a1 * xa + b1 * xb)
                acc[2 * H + i] += d2 * (a2 * xa + b2 * xb)
                acc[3 * H + i] += d3 * (a3 * xa + b3 * xb)
            t0 += o0 * xg
            t1 += o1 * xg
            t2 += o2 * xg
            t3 += o3 * xg
        for i in range(H):
            t0 += acc[i]
            t1 += acc[H + i]
            t2 += acc[2 * H + i]
            t3 += acc[3 * H + i]
        return t0, t1, t2, t3

    # ---- acc += a_r · row_r for 1, 2 or 4 rows (the down columns), one pass over acc
    @njit(fastmath=FM, nogil=True)
    def qacc1(p, q16, j0, a0, acc, ng, db, sb, ob):
        for gi in range(ng):
            xo = gi * GS
            bo = db + gi * GB
            d0, o0 = scale_off(q16, j0, gi, sb, ob)
            c0 = a0 * d0
            oo = a0 * o0
            for i in range(H):
                l0, h0 = lohi(p, j0, bo, i)
                acc[xo + i] += c0 * l0 + oo
                acc[xo + H + i] += c0 * h0 + oo

    @njit(fastmath=FM, nogil=True)
    def qacc2(p, q16, j0, j1, a0, a1, acc, ng, db, sb, ob):
        for gi in range(ng):
            xo = gi * GS
            bo = db + gi * GB
            d0, o0 = scale_off(q16, j0, gi, sb, ob)
            d1, o1 = scale_off(q16, j1, gi, sb, ob)
            c0 = a0 * d0
            c1 = a1 * d1
            oo = a0 * o0 + a1 * o1
            for i in range(H):
                l0, h0 = lohi(p, j0, bo, i)
                l1, h1 = lohi(p, j1, bo, i)
                acc[xo + i] += c0 * l0 + c1 * l1 + oo
                acc[xo + H + i] += c0 * h0 + c1 * h1 + oo

    @njit(fastmath=FM, nogil=True)
    def qacc4(p, q16, j0, j1, j2, j3, a0, a1, a2, a3, acc, ng, db, sb, ob):
        for gi in range(ng):
            xo = gi * GS
            bo = db + gi * GB
            d0, o0 = scale_off(q16, j0, gi, sb, ob)
            d1, o1 = scale_off(q16, j1, gi, sb, ob)
            d2, o2 = scale_off(q16, j2, gi, sb, ob)
            d3, o3 = scale_off(q16, j3, gi, sb, ob)
            c0 = a0 * d0
            c1 = a1 * d1
            c2 = a2 * d2
            c3 = a3 * d3
            oo = a0 * o0 + a1 * o1 + a2 * o2 + a3 * o3
            for i in range(H):
                l0, h0 = lohi(p, j0, bo, i)
                l1, h1 = lohi(p, j1, bo, i)
                l2, h2 = lohi(p, j2, bo, i)
                l3, h3 = lohi(p, j3, bo, i)
                acc[xo + i] += c0 * l0 + c1 * l1 + c2 * l2 + c3 * l3 + oo
                acc[xo + H + i] += c0 * h0 + c1 * h1 + c2 * h2 + c3 * h3 + oo

    # L: the layout constants of one call, (ng, gate scale index, gate offset index, down data byte,
    # up scale index, up offset index, down scale index, down offset index)
    @njit(fastmath=FM, nogil=True)
    def flush(x, xs, ud, u16, acc, pj, ps, n, G, L):
        """Up/down of the n (<= G) queued slots pj with their silu(gate) ps: 4, 2, 1 at a time."""
        ng, gsb, gob, ddb, usb, uob, dsb, dob = L
        i = 0
        if G >= 4:
            while i + 4 <= n:
                j0, j1, j2, j3 = pj[i], pj[i + 1], pj[i + 2], pj[i + 3]
                u0, u1, u2, u3 = qdot4(ud, u16, j0, j1, j2, j3, x, xs, ng, 0, usb, uob)
                qacc4(ud, u16, j0, j1, j2, j3, ps[i] * u0, ps[i + 1] * u1, ps[i + 2] * u2, ps[i + 3] * u3, acc,
                      ng, ddb, dsb, dob)
                i += 4
        if G >= 2:
            while i + 2 <= n:
                j0, j1 = pj[i], pj[i + 1]
                u0, u1 = qdot2(ud, u16, j0, j1, x, xs, ng, 0, usb, uob)
                qacc2(ud, u16, j0, j1, ps[i] * u0, ps[i + 1] * u1, acc, ng, ddb, dsb, dob)
                i += 2
        while i < n:
            j0 = pj[i]
            qacc1(ud, u16, j0, ps[i] * qdot1(ud, u16, j0, x, xs, ng, 0, usb, uob), acc, ng, ddb, dsb, dob)
            i += 1

    @njit(fastmath=FM, nogil=True)
    def gates(x, xs, gt, g16, js, ii, n, sv, G, L):
        """silu(gate · x) of slots js[ii:ii + w] into sv[:w], w = G when that many are left (else 2, 1)."""
        ng, gsb, gob = L[0], L[1], L[2]
        if G >= 4 and ii + 4 <= n:
            g0, g1, g2, g3 = qdot4(gt, g16, js[ii], js[ii + 1], js[ii + 2], js[ii + 3], x, xs, ng, 0, gsb, gob)
            sv[0], sv[1], sv[2], sv[3] = silu(g0), silu(g1), silu(g2), silu(g3)
            return 4
        if G >= 2 and ii + 2 <= n:
            g0, g1 = qdot2(gt, g16, js[ii], js[ii + 1], x, xs, ng, 0, gsb, gob)
            sv[0], sv[1] = silu(g0), silu(g1)
            return 2
        sv[0] = silu(qdot1(gt, g16, js[ii], x, xs, ng, 0, gsb, gob))
        return 1

    @njit(fastmath=FM, nogil=True)
    def run_slots(x, xs, gt, g16, ud, u16, acc, js, n, tm, thr, pj, ps, qn, sv, active, counts, K, G, L):
        """Slots js[:n]: gate dots G at a time. tm 0: every slot; 1 (gate rule): only those with |s| > thr get
        their up/down rows read; 2 (product rule): the up row of every slot is read, a = s·(up · x), and
        the down row only where |a| > thr (one slot at a time: the decision needs its up dot first).
        Gate-rule slots are queued in pj/ps (qn[0] of them, carried between calls) and read G at a time;
        the caller flushes what is left at the end. Marks `active`; returns the number active."""
        ng, gsb, gob, ddb, usb, uob, dsb, dob = L
        cnt = 0
        q = qn[0]
        ii = 0
        while ii < n:
            w = gates(x, xs, gt, g16, js, ii, n, sv, G, L)
            for r in range(w):
                j = js[ii + r]
                s = sv[r]
                if tm == 2:
                    a = s * qdot1(ud, u16, j, x, xs, ng, 0, usb, uob)
                    if not abs(a) > thr:
                        active[j] = 0
                        continue
                    active[j] = 1
                    if K:
                        counts[j] += 1.0
                    cnt += 1
                    qacc1(ud, u16, j, a, acc, ng, ddb, dsb, dob)
                    continue
                if tm == 1 and not abs(s) > thr:
                    active[j] = 0
                    continue
                active[j] = 1
                if K:
                    counts[j] += 1.0
                cnt += 1
                pj[q] = j
                ps[q] = s
                q += 1
                if q == G:
                    flush(x, xs, ud, u16, acc, pj, ps, q, G, L)
                    q = 0
            ii += w
        qn[0] = q
        return cnt

    @njit(parallel=True, fastmath=FM, nogil=True, cache=False)
    def qcold_ffn(x, gt, g16, ud, u16, mask, thr, mode, G, DYN, parts, y, active, ctr, counts, xs):
        """mode 0 exact, 1 threshold (gate rule), 2 predictor (mask[j] != 0 selects slot j), 3 threshold with the
        product rule; G neurons side by side
        (1, 2, 4); DYN: dynamic schedule in threshold and predictor mode. Returns #active.
        gt/ud: the packed rows (int8 for symmetric INT8, else uint8), g16/u16 the same bytes as uint16
        (for the scales). parts: float32 [T, D + 1] per-thread accumulators (+ count). ctr: int64 [1].
        counts: float32 [C] += 1 per active slot, or [0]. xs: float32 [D / group] scratch."""
        K = counts.shape[0] > 0
        TM = 1 if mode == 1 else (2 if mode == 3 else 0)  # run_slots' threshold kind
        C = gt.shape[0]
        D = x.shape[0]
        T = parts.shape[0]
        ng = D // GS
        nd = D * bits // 8  # data bytes of a D-vector
        gsb = nd // 2  # gate: scales after the data (uint16 index)
        gob = gsb + ng
        usb = nd  # up_down: data of 2D values (2·nd bytes), then 2·ng scales (up's, then down's), offsets
        uob = usb + 2 * ng
        L = (ng, gsb, gob, nd, usb, uob, usb + ng, uob + ng)
        for gi in range(ng):
            v = F0
            for i in range(GS):
                v += x[gi * GS + i]
            xs[gi] = v
        ctr[0] = 0
        for t in prange(T):
            acc = parts[t]
            for k in range(D):
                acc[k] = 0.0
            cnt = 0
            pj = np.empty(4, dtype=np.int64)
            ps = np.empty(4, dtype=np.float32)
            sv = np.empty(4, dtype=np.float32)
            qn = np.zeros(1, dtype=np.int64)
            if DYN and mode != 0:
                # chunks of CHUNK slots; the selected ones are gate-dotted G at a time, and fewer than G left
                # at a chunk's end wait for the next chunk's (predictor mode: ~6 of 64 at 10% density)
                js = np.empty(CHUNK + 4, dtype=np.int64)
                n = 0
                while True:
                    s0 = _fetch_add(ctr, np.int64(CHUNK))
                    if s0 >= C:
                        break
                    for j in range(s0, min(C, s0 + CHUNK)):
                        if TM != 0 or mask[j] != 0:
                            js[n] = j
                            n += 1
                    m = n - n % G
                    cnt += run_slots(x, xs, gt, g16, ud, u16, acc, js, m, TM, thr, pj, ps, qn, sv, active,
                                     counts, K, G, L)
                    for i in range(n - m):
                        js[i] = js[m + i]
                    n -= m
                cnt += run_slots(x, xs, gt, g16, ud, u16, acc, js, n, TM, thr, pj, ps, qn, sv, active,
                                 counts, K, G, L)
            elif mode == 2:
                # static predictor schedule: an equal share of the active slots, in slot order
                ntot = 0
                for j in range(C):
                    ntot += mask[j] != 0
                lo = t * ntot // T
                hi = (t + 1) * ntot // T
                js = np.empty(hi - lo + 1, dtype=np.int64)
                n = 0
                seen = 0
                for j in range(C):
                    if mask[j] != 0:
                        if seen >= hi:
                            break
                        if seen >= lo:
                            js[n] = j
                            n += 1
                        seen += 1
                cnt += run_slots(x, xs, gt, g16, ud, u16, acc, js, n, False, thr, pj, ps, qn, sv, active, counts,
                                 K, G, L)
            else:
                # exact, and static threshold: slots t, t + T, ... (slot order is hottest first: striding balances)
                js = np.empty((C + T - 1) // T + 1, dtype=np.int64)
                n = 0
                for j in range(t, C, T):
                    js[n] = j
                    n += 1
                cnt += run_slots(x, xs, gt, g16, ud, u16, acc, js, n, TM, thr, pj, ps, qn, sv, active,
                                 counts, K, G, L)
            flush(x, xs, ud, u16, acc, pj, ps, qn[0], G, L)
            parts[t, D] = cnt  # the count rides in the spare last column
        total = 0
        for t in range(T):
            total += int(parts[t, D])
        step = (D + T - 1) // T
        for t in prange(T):
            lo = t * step
            hi = min(D, lo + step)
            for k in range(lo, hi):
                v = F0
                for r in range(T):
                    v += parts[r, k]
                y[k] = v
        return total

    return qcold_ffn


def _views(qt: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes view, uint16 view) of qt's packed bytes, no copy: int8 codes for symmetric INT8."""
    p = qt.packed.numpy()
    codes = p.view(np.int8) if (qt.bits == 8 and not qt.asym) else p
    return codes, p.view(np.uint16)


def check_layout(gate: QTensor, up_down: QTensor, dim: int) -> None:
    """The cold side's two tensors must agree: gate [C, D] and up_down [C, 2D] in one format, on the CPU."""
    C, D = gate.shape
    if D != dim or up_down.shape != (C, 2 * D) or up_down.fmt != gate.fmt:
        raise InputError(f"quantized cold rows do not fit together: gate {gate.fmt.name} {list(gate.shape)}, "
                         f"up_down {up_down.fmt.name} {list(up_down.shape)} (model dim {dim})",
                         "export the Bundle again: its cold gate and up_down tensors must share one format")
    if gate.device.type != "cpu" or up_down.device.type != "cpu":
        raise ValueError("the cold kernel reads CPU tensors")
    if not (gate.packed.is_contiguous() and up_down.packed.is_contiguous()):
        raise ValueError("the cold kernel needs contiguous packed rows")


class QColdKernel:
    """The quantized cold FFN of one process: picks the backend once, reuses its buffers across calls.

    Call with x [D] float32 (contiguous, CPU), gate QTensor [C, D], up_down QTensor [C, 2D] (same format),
    or `run(layer, x, mode, rule=...)` with a hotcold.runtime.model.CpuLayer holding them (as ColdKernel).
    The numba kernel computes SiLU gates; a ReLU model runs the torch path.
    """

    def __init__(self, dim: int, backend: str = "auto", threads: int | None = None, group: int | None = None,
                 dynamic: bool | None = None, activation: str = "silu"):
        self.backend = resolve_backend(backend)
        if activation != "silu" and self.backend == "numba":
            if backend == "numba":
                raise InputError("the quantized numba cold kernel computes SiLU gates only", "use --cpu-kernel torch")
            self.backend = "torch"
        self.activation = activation
        self._act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.relu
        self.group = default_qgroup() if group is None else int(group)
        if self.group not in QGROUPS:
            raise InputError(f"quantized cold kernel group {self.group} is not supported", f"use one of {QGROUPS}")
        self.dynamic = default_dynamic() if dynamic is None else bool(dynamic)
        self.dim = dim
        self.threads = threads
        self.y = torch.zeros(dim, dtype=torch.float32)
        self._ctr = np.zeros(1, dtype=np.int64)
        self._no_counts = np.zeros(0, dtype=np.float32)
        self._xs: np.ndarray | None = None
        self._parts: np.ndarray | None = None
        self._q4 = None  # hotcold.runtime.cq4's predictor-mode kernel for symmetric INT4 (where it builds)
        if self.backend == "numba":
            import numba

            numba.set_num_threads(min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
            self._parts = np.zeros((numba.get_num_threads(), dim + 1), dtype=np.float32)
            from hotcold.runtime import cq4

            lib = cq4.load()
            if lib is not None:
                self._q4 = cq4.Q4Predictor(lib, numba.get_num_threads())

    @property
    def name(self) -> str:
        return self.backend + ("+avx512-q4" if self._q4 is not None else "")

    def run(self, layer: Any, x: torch.Tensor, mode: str, *, rule: str = "gate", mask: torch.Tensor | None = None,
            thr: float = 0.0, active: torch.Tensor | None = None, out: torch.Tensor | None = None,
            counts: np.ndarray | None = None) -> ColdResult:
        """One layer's cold partial sum for a CpuLayer whose gate / up_down are QTensors (bundled layout)."""
        if not isinstance(layer.gate, QTensor) or not isinstance(layer.up_down, QTensor):
            raise InputError("the quantized cold kernel reads quantized rows in the bundled layout",
                             "export the Bundle with --dtype q4 or q8 (its CPU layout is bundled)")
        return self(x, layer.gate, layer.up_down, mode, mask=mask, thr=thr, active=active, out=out, counts=counts,
                    rule=rule)

    def warm_up(self, fmt: QFormat) -> None:
        """Compile (numba) for `fmt` on a tiny problem, so timing never includes the JIT."""
        from hotcold.quant import quantize

        D = self.dim
        g = quantize(torch.zeros(2, D), fmt.bits, fmt.group, fmt.asym)
        ud = quantize(torch.zeros(2, 2 * D), fmt.bits, fmt.group, fmt.asym)
        x = torch.zeros(D)
        act = torch.zeros(2, dtype=torch.uint8)
        for mode in MODES:
            self(x, g, ud, mode, mask=torch.ones(2, dtype=torch.uint8), thr=0.0, active=act)

    def __call__(self, x: torch.Tensor, gate: QTensor, up_down: QTensor, mode: str, *,
                 mask: torch.Tensor | None = None, thr: float = 0.0, active: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, counts: np.ndarray | None = None, rule: str = "gate") -> ColdResult:
        """mask: uint8 [C], nonzero = compute this slot (predictor mode); active: uint8 [C] flags out
        (in predictor mode the mask itself: pass the same tensor or none); out: float32 [D] for y;
        counts: float32 [C], += 1 where a slot was active; rule: threshold mode's `gate` or `product`."""
        C, D = gate.shape
        check_layout(gate, up_down, self.dim)
        y = self.y if out is None else out
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}")
        if rule not in ("gate", "product"):
            raise ValueError(f"rule {rule!r}")
        kmode = "product" if mode == "threshold" and rule == "product" else mode
        if mode == "predictor" and mask is None:
            raise ValueError("predictor mode needs a mask")
        if active is None:
            active = mask if mode == "predictor" else torch.zeros(C, dtype=torch.uint8)
        t0 = time.perf_counter()
        if C == 0:
            y.zero_()
            n = 0
        elif (self._q4 is not None and kmode == "predictor" and self._q4.handles(gate.fmt, D)
              and gate.packed.is_contiguous() and up_down.packed.is_contiguous() and x.is_contiguous()):
            m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
            n = self._q4(x.numpy(), gate.packed.numpy(), up_down.packed.numpy(), m.numpy(), y.numpy())
            if counts is not None:
                counts += m.numpy()
        elif self.backend == "numba":
            f = gate.fmt
            fn = _numba_qkernel(f.bits, f.asym, f.group)
            ng = D // f.group
            if self._xs is None or self._xs.shape[0] < ng:
                self._xs = np.zeros(ng, dtype=np.float32)
            gt, g16 = _views(gate)
            ud, u16 = _views(up_down)
            m = mask if mask is not None else active
            n = fn(x.numpy(), gt, g16, ud, u16, m.numpy(), np.float32(thr), _MODE_ID[kmode], self.group,
                   self.dynamic, self._parts, y.numpy(),
                   active.numpy(), self._ctr, self._no_counts if counts is None else counts, self._xs[:ng])
        else:
            n = self._torch(x, gate, up_down, kmode, mask, thr, active, y)
            if counts is not None:
                counts += active.numpy()
        dt = time.perf_counter() - t0
        return ColdResult(y=y, n_active=int(n), seconds=dt, bytes_read=bytes_read(gate, up_down, kmode, int(n)))

    def _torch(self, x, gate, up_down, mode, mask, thr, active, y) -> int:
        D = gate.shape[1]
        act = self._act
        if mode == "predictor":
            idx = mask.nonzero().flatten()
            g = dequantize(gate.take_rows(idx)) @ x
        elif mode == "product":
            ud = dequantize(up_down)
            a = act(dequantize(gate) @ x) * (ud[:, :D] @ x)
            idx = (a.abs() > thr).nonzero().flatten()
            y.copy_(a.index_select(0, idx) @ ud.index_select(0, idx)[:, D:])
            active.zero_()
            active[idx] = 1
            return int(idx.numel())
        else:
            g = dequantize(gate) @ x
            idx = None
            if mode == "threshold":
                idx = (act(g).abs() > thr).nonzero().flatten()
                g = g.index_select(0, idx)
        rows = dequantize(up_down if idx is None else up_down.take_rows(idx))
        a = act(g) * (rows[:, :D] @ x)
        y.copy_(a @ rows[:, D:])
        if idx is None:
            active.fill_(1)
            return gate.shape[0]
        if active is not mask:
            active.zero_()
            active[idx] = 1
        return int(idx.numel())


def bytes_read(gate: QTensor, up_down: QTensor, mode: str, n_active: int) -> int:
    """Bytes a call touched: every gate row in exact and threshold mode, whole rows of the active slots;
    the product rule ("product") reads every up row too and the down column of the active slots."""
    C = gate.shape[0]
    if mode == "exact":
        return C * (gate.row_bytes + up_down.row_bytes)
    if mode == "threshold":
        return C * gate.row_bytes + n_active * up_down.row_bytes
    if mode == "product":
        half = up_down.row_bytes // 2  # up's bytes, down's bytes: the same row length D
        return C * (gate.row_bytes + half) + n_active * half
    return n_active * (gate.row_bytes + up_down.row_bytes)


__all__ = ["QGROUPS", "QColdKernel", "bytes_read", "check_layout", "default_qgroup"]
