"""The CPU side's cold-neuron kernel: one fused pass over the row-bundled cold FFN rows.

Layout (the Bundle's, design.md §2): per layer, cold slot j holds neuron `cold_ids[j]` as
    gate    [C, D]       its gate row
    up_down [C, 2D]      its up row followed by its down column (row-column bundling)
so an active neuron is two contiguous reads (16 KB + 32 KB at LLaMA-70B shape in fp16).

For every slot j the kernel computes, with x [D] float32 and s = silu(gate_j · x):
    exact       every slot is active
    threshold   rule `gate`: active iff |s| > t (CATS: decidable from the gate row alone; the up/down
                rows of an inactive neuron are never read); rule `product`: active iff |s·(up_j · x)| > t
                (the gate and up rows of every slot are read, the down row only when active)
    predictor   the slots whose `mask` byte is set (chosen on the GPU side) are active; no other
                row is read
and returns y = Σ_active s·(up_j · x)·down_j  [D] float32, the layer's CPU partial sum.

Two implementations with the same semantics:
- `numba` (when importable): in exact and threshold mode threads take slots strided (slot order is
  hottest-first, so contiguous chunks would give one thread all the dense work); in predictor mode each
  thread takes an equal share of the *active* slots (striding leaves some threads more active slots than
  others, and the call lasts as long as its slowest thread); each keeps a private float32 accumulator of D
  values, then the partials are summed. With `group` = G > 1 a thread streams G neurons' rows side by side
  in one loop (G DRAM streams in flight per core instead of one; not software prefetch, which breaks the
  loops' vectorisation: docs/gpu.md, "Where the defaults come from"). Weights stay 16-bit in memory and
  are widened in registers:
  fp16 through LLVM's `fpext half` (one vcvtph2ps with F16C), bf16 by a 16-bit shift; numba itself
  has no float16 arithmetic, so the arrays are passed as uint16 and reinterpreted by two tiny
  intrinsics. float32 weights are read as they are.
- `torch`: gathers the active rows with index_select and uses matrix products (the fallback on a
  machine without numba, e.g. CI; far slower at scale because the gather copies the rows).

Both also report which slots were active (uint8 flags, for the dynamic mode's statistics) and the
number of active slots; `bytes_read` gives the bytes a call touched, for achieved-bandwidth reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

MODES = ("exact", "threshold", "predictor")
RULES = ("gate", "product")  # threshold mode's activation rule: |act(g)| > t, or |act(g) * u| > t
_MODE_ID = {"exact": 0, "threshold": 1, "predictor": 2, "product": 3}
BACKENDS = ("auto", "numba", "torch")


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("HOTCOLD_NO_NUMBA", "") in ("", "0")


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        from hotcold.errors import InputError

        raise InputError(f"unknown CPU kernel backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "numba" if numba_available() else "torch"
    if backend == "numba" and not numba_available():
        from hotcold.errors import InputError

        raise InputError("the numba CPU kernel was asked for but numba is not installed",
                         "pip install numba, or use --cpu-kernel torch")
    return backend


# ---- numba -------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def fetch_add() -> Any:
    """A numba intrinsic: fetch_add(arr, v) atomically adds v to arr[0] (int64) and returns the old value
    (the dynamic schedules' shared counter)."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _fetch_add(typingctx, arr, val):
        sig = types.int64(arr, types.int64)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", ary.data, args[1], "monotonic")

        return sig, codegen

    return _fetch_add


GROUPS = (1, 2, 4, 8)


def default_group() -> int:
    """Neurons a thread streams side by side: HOTCOLD_COLD_GROUP, else 4 (the fastest group measured in the
    engine's call pattern: docs/gpu.md, "Where the defaults come from")."""
    v = os.environ.get("HOTCOLD_COLD_GROUP", "")
    return int(v) if v.strip() else 4


def default_dynamic() -> bool:
    """Dynamic schedule in predictor and threshold mode unless HOTCOLD_COLD_DYNAMIC=0 (a thread slowed by its
    memory or the hypervisor then takes fewer chunks; measured faster than the static split at group 4:
    docs/gpu.md, "Where the defaults come from")."""
    return os.environ.get("HOTCOLD_COLD_DYNAMIC", "1") not in ("", "0")


@lru_cache(maxsize=None)
def _numba_kernels(kind: str, group: int = 1, dynamic: bool = False) -> Any:
    """Compile the kernel for weights stored as `kind` (float16 | bfloat16 | float32).

    group: in exact and predictor mode each thread streams the rows of `group` neurons side by side
    (one loop reads gate row j0 and j1 ... together), so that a core keeps several DRAM streams in
    flight instead of one, and reads and writes its accumulator once per group for the down rows.
    Threshold mode (dynamic schedule) computes G gates side by side and queues the neurons that pass for
    grouped up/down reads; with the static schedule it goes one neuron at a time.
    dynamic: in predictor and threshold mode threads take chunks of CHUNK slots from a shared atomic
    counter instead of a fixed share each (a thread slowed by its memory or by the hypervisor then does
    less; the partial sums' order, so y's last bits, can differ from call to call). Exact mode stays
    static: its result is reproducible to the bit.
    """
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, not {group}")

    @intrinsic
    def _h2f(typingctx, v):  # uint16 holding fp16 bits -> float32
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return sig, codegen

    @intrinsic
    def _b2f(typingctx, v):  # uint16 holding bf16 bits -> float32
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            w = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(w, ir.FloatType())

        return sig, codegen

    _fetch_add = fetch_add()

    if kind == "float16":
        widen = _h2f
    elif kind == "bfloat16":
        widen = _b2f
    else:
        @njit(inline="always")
        def widen(v):
            return v

    # reassociation lets LLVM vectorise the dot products; no 'ninf': exp(-g) may overflow to inf
    FM = {"reassoc", "contract", "arcp", "nsz"}
    G = group
    DYN = dynamic
    CHUNK = 64  # slots per grab (~6 active neurons at 10% density: ~60 µs of one thread's work at 70B shape)

    @njit(inline="always", fastmath=FM)
    def silu(g):
        return g / (np.float32(1.0) + np.exp(-g))

    @njit(inline="always", fastmath=FM)
    def dot1(w, j, x):
        s = np.float32(0.0)
        for k in range(x.shape[0]):
            s += widen(w[j, k]) * x[k]
        return s

    @njit(inline="always", fastmath=FM)
    def dot2(w, j0, j1, x):
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        for k in range(x.shape[0]):
            xk = x[k]
            s0 += widen(w[j0, k]) * xk
            s1 += widen(w[j1, k]) * xk
        return s0, s1

    @njit(inline="always", fastmath=FM)
    def dot4(w, j0, j1, j2, j3, x):
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for k in range(x.shape[0]):
            xk = x[k]
            s0 += widen(w[j0, k]) * xk
            s1 += widen(w[j1, k]) * xk
            s2 += widen(w[j2, k]) * xk
            s3 += widen(w[j3, k]) * xk
        return s0, s1, s2, s3

    @njit(inline="always", fastmath=FM)
    def dot8(w, j, x):  # j: 8 slots
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        j0, j1, j2, j3, j4, j5, j6, j7 = j[0], j[1], j[2], j[3], j[4], j[5], j[6], j[7]
        for k in range(x.shape[0]):
            xk = x[k]
            s0 += widen(w[j0, k]) * xk
            s1 += widen(w[j1, k]) * xk
            s2 += widen(w[j2, k]) * xk
            s3 += widen(w[j3, k]) * xk
            s4 += widen(w[j4, k]) * xk
            s5 += widen(w[j5, k]) * xk
            s6 += widen(w[j6, k]) * xk
            s7 += widen(w[j7, k]) * xk
        return s0, s1, s2, s3, s4, s5, s6, s7

    # ud*: given s = silu(gate · x) of a group of neurons, add s·(up · x)·down of each to acc
    @njit(inline="always", fastmath=FM)
    def ud1(x, up_down, acc, j, s, D):
        a = s * dot1(up_down, j, x)
        for k in range(D):
            acc[k] += a * widen(up_down[j, D + k])

    @njit(inline="always", fastmath=FM)
    def ud2(x, up_down, acc, j0, j1, s0, s1, D):
        u0, u1 = dot2(up_down, j0, j1, x)
        a0 = s0 * u0
        a1 = s1 * u1
        for k in range(D):
            acc[k] += a0 * widen(up_down[j0, D + k]) + a1 * widen(up_down[j1, D + k])

    @njit(inline="always", fastmath=FM)
    def ud4(x, up_down, acc, j0, j1, j2, j3, s0, s1, s2, s3, D):
        u0, u1, u2, u3 = dot4(up_down, j0, j1, j2, j3, x)
        a0, a1, a2, a3 = s0 * u0, s1 * u1, s2 * u2, s3 * u3
        for k in range(D):
            acc[k] += (a0 * widen(up_down[j0, D + k]) + a1 * widen(up_down[j1, D + k])
                       + a2 * widen(up_down[j2, D + k]) + a3 * widen(up_down[j3, D + k]))

    @njit(inline="always", fastmath=FM)
    def ud8(x, up_down, acc, j, s, D):  # j, s: 8 slots and their silu(gate · x)
        u = dot8(up_down, j, x)
        a0, a1, a2, a3 = s[0] * u[0], s[1] * u[1], s[2] * u[2], s[3] * u[3]
        a4, a5, a6, a7 = s[4] * u[4], s[5] * u[5], s[6] * u[6], s[7] * u[7]
        j0, j1, j2, j3, j4, j5, j6, j7 = j[0], j[1], j[2], j[3], j[4], j[5], j[6], j[7]
        for k in range(D):
            acc[k] += (a0 * widen(up_down[j0, D + k]) + a1 * widen(up_down[j1, D + k])
                       + a2 * widen(up_down[j2, D + k]) + a3 * widen(up_down[j3, D + k])
                       + a4 * widen(up_down[j4, D + k]) + a5 * widen(up_down[j5, D + k])
                       + a6 * widen(up_down[j6, D + k]) + a7 * widen(up_down[j7, D + k]))

    @njit(inline="always", fastmath=FM)
    def flush(x, up_down, acc, pj, ps, n, D):
        """The n (<= G) queued neurons pj with their ps: in groups of G, then 4, 2, 1."""
        i = 0
        if G == 8 and n == 8:
            ud8(x, up_down, acc, pj, ps, D)
            i = 8
        if G >= 4:
            while i + 4 <= n:
                ud4(x, up_down, acc, pj[i], pj[i + 1], pj[i + 2], pj[i + 3], ps[i], ps[i + 1], ps[i + 2], ps[i + 3], D)
                i += 4
        if G >= 2:
            while i + 2 <= n:
                ud2(x, up_down, acc, pj[i], pj[i + 1], ps[i], ps[i + 1], D)
                i += 2
        while i < n:
            ud1(x, up_down, acc, pj[i], ps[i], D)
            i += 1

    @njit(inline="always", fastmath=FM)
    def dflush(up_down, acc, pj, pa, n, D):
        """Product rule: acc += a·down of the n queued neurons pj (a in pa), 4, 2, then 1 at a time."""
        i = 0
        while i + 4 <= n:
            j0, j1, j2, j3 = pj[i], pj[i + 1], pj[i + 2], pj[i + 3]
            a0, a1, a2, a3 = pa[i], pa[i + 1], pa[i + 2], pa[i + 3]
            for k in range(D):
                acc[k] += (a0 * widen(up_down[j0, D + k]) + a1 * widen(up_down[j1, D + k])
                           + a2 * widen(up_down[j2, D + k]) + a3 * widen(up_down[j3, D + k]))
            i += 4
        while i + 2 <= n:
            j0, j1 = pj[i], pj[i + 1]
            a0, a1 = pa[i], pa[i + 1]
            for k in range(D):
                acc[k] += a0 * widen(up_down[j0, D + k]) + a1 * widen(up_down[j1, D + k])
            i += 2
        while i < n:
            j0 = pj[i]
            a0 = pa[i]
            for k in range(D):
                acc[k] += a0 * widen(up_down[j0, D + k])
            i += 1

    # whole neurons (predictor and exact mode): gate, up and down rows of a group streamed side by side
    @njit(inline="always", fastmath=FM)
    def one(x, gate, up_down, acc, j, D):
        ud1(x, up_down, acc, j, silu(dot1(gate, j, x)), D)

    @njit(inline="always", fastmath=FM)
    def two(x, gate, up_down, acc, j0, j1, D):
        g0, g1 = dot2(gate, j0, j1, x)
        ud2(x, up_down, acc, j0, j1, silu(g0), silu(g1), D)

    @njit(inline="always", fastmath=FM)
    def four(x, gate, up_down, acc, j0, j1, j2, j3, D):
        g0, g1, g2, g3 = dot4(gate, j0, j1, j2, j3, x)
        ud4(x, up_down, acc, j0, j1, j2, j3, silu(g0), silu(g1), silu(g2), silu(g3), D)

    @njit(inline="always", fastmath=FM)
    def eight(x, gate, up_down, acc, j, sv, D):  # sv: scratch for the 8 silu values
        g = dot8(gate, j, x)
        for i in range(8):
            sv[i] = silu(g[i])
        ud8(x, up_down, acc, j, sv, D)

    @njit(inline="always", fastmath=FM)
    def whole(x, gate, up_down, acc, js, n, sv, active, counts, K, D):
        """The n slots js[:n], whole neurons, in groups of G, then 4, 2, 1; marked active (and counted)."""
        ii = 0
        if G == 8:
            while ii + 8 <= n:
                eight(x, gate, up_down, acc, js[ii:ii + 8], sv, D)
                ii += 8
        if G >= 4:
            while ii + 4 <= n:
                four(x, gate, up_down, acc, js[ii], js[ii + 1], js[ii + 2], js[ii + 3], D)
                ii += 4
        if G >= 2:
            while ii + 2 <= n:
                two(x, gate, up_down, acc, js[ii], js[ii + 1], D)
                ii += 2
        while ii < n:
            one(x, gate, up_down, acc, js[ii], D)
            ii += 1
        for ii in range(n):
            active[js[ii]] = 1
            if K:
                counts[js[ii]] += 1.0

    @njit(parallel=True, fastmath=FM, nogil=True, cache=False)
    def cold_ffn(x, gate, up_down, mask, thr, mode, parts, y, active, ctr, counts):
        """mode 0 exact, 1 threshold (gate rule), 2 predictor (mask[j] != 0 selects slot j), 3 threshold
        (product rule). Returns #active.
        ctr: int64 [1], the dynamic schedule's shared counter (zeroed here). counts: float32 [C] to which
        every active slot adds 1 (the dynamic mode's statistics; each slot is one thread's), or [0]."""
        K = counts.shape[0] > 0
        C = gate.shape[0]
        D = x.shape[0]
        T = parts.shape[0]
        ctr[0] = 0
        for t in prange(T):
            acc = parts[t]
            for k in range(D):
                acc[k] = 0.0
            cnt = 0
            n = 0
            mine = np.empty(G, dtype=np.int64)
            sv = np.empty(8, dtype=np.float32)
            if mode == 3:
                # product rule: gate and up dots of up to 4 slots side by side (the up row is the first half
                # of up_down), a = silu(g)·u; the slots over the threshold queue up for their down rows.
                # Slots come in chunks of CHUNK: consecutive from the shared counter (dynamic), or this
                # thread's strided share (static)
                pa = np.empty(G, dtype=np.float32)
                rows = np.empty(CHUNK, dtype=np.int64)
                b0 = t
                while True:
                    m = 0
                    if DYN:
                        c0 = _fetch_add(ctr, np.int64(CHUNK))
                        if c0 >= C:
                            break
                        m = min(C, c0 + CHUNK) - c0
                        for i in range(m):
                            rows[i] = c0 + i
                    else:
                        while m < CHUNK and b0 < C:
                            rows[m] = b0
                            m += 1
                            b0 += T
                        if m == 0:
                            break
                    ii = 0
                    while ii < m:
                        w = 1
                        if G >= 4 and ii + 4 <= m:
                            j0, j1, j2, j3 = rows[ii], rows[ii + 1], rows[ii + 2], rows[ii + 3]
                            g0, g1, g2, g3 = dot4(gate, j0, j1, j2, j3, x)
                            u0, u1, u2, u3 = dot4(up_down, j0, j1, j2, j3, x)
                            sv[0], sv[1], sv[2], sv[3] = silu(g0) * u0, silu(g1) * u1, silu(g2) * u2, silu(g3) * u3
                            w = 4
                        elif G >= 2 and ii + 2 <= m:
                            g0, g1 = dot2(gate, rows[ii], rows[ii + 1], x)
                            u0, u1 = dot2(up_down, rows[ii], rows[ii + 1], x)
                            sv[0], sv[1] = silu(g0) * u0, silu(g1) * u1
                            w = 2
                        else:
                            sv[0] = silu(dot1(gate, rows[ii], x)) * dot1(up_down, rows[ii], x)
                        for i in range(w):
                            j = rows[ii + i]
                            if abs(sv[i]) > thr:
                                mine[n] = j
                                pa[n] = sv[i]
                                n += 1
                                active[j] = 1
                                if K:
                                    counts[j] += 1.0
                                cnt += 1
                                if n == G:
                                    dflush(up_down, acc, mine, pa, n, D)
                                    n = 0
                            else:
                                active[j] = 0
                        ii += w
                dflush(up_down, acc, mine, pa, n, D)
                n = 0
            elif DYN and mode == 1:
                # threshold: chunks of CHUNK consecutive slots (their gate rows are one contiguous block),
                # gate dots G rows at a time; the neurons over the threshold queue up for their up/down rows
                ps = np.empty(G, dtype=np.float32)
                rows = np.empty(8, dtype=np.int64)
                while True:
                    s0 = _fetch_add(ctr, np.int64(CHUNK))
                    if s0 >= C:
                        break
                    e = min(C, s0 + CHUNK)
                    jj = s0
                    while jj < e:
                        w = 1
                        if G == 8 and jj + 8 <= e:
                            for i in range(8):
                                rows[i] = jj + i
                            g8 = dot8(gate, rows, x)
                            for i in range(8):
                                sv[i] = silu(g8[i])
                            w = 8
                        elif G >= 4 and jj + 4 <= e:
                            g0, g1, g2, g3 = dot4(gate, jj, jj + 1, jj + 2, jj + 3, x)
                            sv[0], sv[1], sv[2], sv[3] = silu(g0), silu(g1), silu(g2), silu(g3)
                            w = 4
                        else:
                            sv[0] = silu(dot1(gate, jj, x))
                        for i in range(w):
                            if abs(sv[i]) > thr:
                                mine[n] = jj + i
                                ps[n] = sv[i]
                                n += 1
                                active[jj + i] = 1
                                if K:
                                    counts[jj + i] += 1.0
                                cnt += 1
                                if n == G:
                                    flush(x, up_down, acc, mine, ps, n, D)
                                    n = 0
                            else:
                                active[jj + i] = 0
                        jj += w
                flush(x, up_down, acc, mine, ps, n, D)
                n = 0
            elif DYN and mode == 2:
                # grab CHUNK slots at a time; active ones queue up until a group is full
                while True:
                    s0 = _fetch_add(ctr, np.int64(CHUNK))
                    if s0 >= C:
                        break
                    for j in range(s0, min(C, s0 + CHUNK)):
                        if mask[j] != 0:
                            mine[n] = j
                            n += 1
                            if n == G:
                                whole(x, gate, up_down, acc, mine, n, sv, active, counts, K, D)
                                cnt += n
                                n = 0
                whole(x, gate, up_down, acc, mine, n, sv, active, counts, K, D)
                cnt += n
                n = 0
            elif mode == 2:
                # predictor: every active slot costs the same bytes, so each thread takes an equal share of
                # them in slot order (the mask is counted by every thread: a few µs, no second barrier)
                ntot = 0
                for j in range(C):
                    ntot += mask[j] != 0
                lo = t * ntot // T
                hi = (t + 1) * ntot // T
                mine = np.empty(hi - lo + 1, dtype=np.int64)
                seen = 0
                j0 = 0
                while j0 + 256 <= C:  # skip whole blocks before this thread's first active slot
                    cb = 0
                    for j in range(j0, j0 + 256):
                        cb += mask[j] != 0
                    if seen + cb > lo:
                        break
                    seen += cb
                    j0 += 256
                n = 0
                for j in range(j0, C):
                    if mask[j] != 0:
                        if seen >= hi:
                            break
                        if seen >= lo:
                            mine[n] = j
                            n += 1
                        seen += 1
            else:
                # this thread's slots: j = t, t + T, ... (slot order is hottest first: striding balances)
                mine = np.empty((C + T - 1) // T + 1, dtype=np.int64)
                n = 0
                for j in range(t, C, T):
                    mine[n] = j
                    n += 1
            if mode == 1 and not DYN:
                for ii in range(n):
                    j = mine[ii]
                    s = silu(dot1(gate, j, x))
                    if abs(s) <= thr:
                        active[j] = 0
                        continue
                    a = s * dot1(up_down, j, x)
                    for k in range(D):
                        acc[k] += a * widen(up_down[j, D + k])
                    active[j] = 1
                    if K:
                        counts[j] += 1.0
                    cnt += 1
            else:
                whole(x, gate, up_down, acc, mine, n, sv, active, counts, K, D)
                cnt += n
            parts[t, D] = cnt  # the count rides in the spare last column
        total = 0
        for t in range(T):
            total += int(parts[t, D])
        # reduce the partials, columns split over threads
        step = (D + T - 1) // T
        for t in prange(T):
            lo = t * step
            hi = min(D, lo + step)
            for k in range(lo, hi):
                v = np.float32(0.0)
                for r in range(T):
                    v += parts[r, k]
                y[k] = v
        return total

    return cold_ffn


@lru_cache(maxsize=None)
def _numba_rows() -> tuple[Any, Any]:
    """gather_rows, scatter_rows (numba specialises them per dtype on first call)."""
    from numba import njit, prange

    @njit(parallel=True, nogil=True, cache=False)
    def gather_rows(src, idx, dst):
        """dst[i] = src[idx[i]] for 2-D arrays (parallel over rows)."""
        for i in prange(idx.shape[0]):
            dst[i, :] = src[idx[i], :]

    @njit(parallel=True, nogil=True, cache=False)
    def scatter_rows(dst, idx, src):
        """dst[idx[i]] = src[i]."""
        for i in prange(idx.shape[0]):
            dst[idx[i], :] = src[i, :]

    return gather_rows, scatter_rows


def _u16(t: torch.Tensor) -> np.ndarray:
    """A 16-bit float tensor's storage as a uint16 numpy array (no copy); float32 as float32."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.numpy()
    raise TypeError(f"cold weights must be float16, bfloat16 or float32, not {t.dtype}")


_KIND = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass
class ColdResult:
    y: torch.Tensor  # [D] float32 partial sum (a view of a reused buffer: copy before the next call)
    n_active: int
    seconds: float
    bytes_read: int


class ColdKernel:
    """The cold FFN of one process: picks the backend once, reuses its buffers across calls.

    `run(layer, x, mode, rule=...)` takes a CpuLayer in either Bundle layout: `bundled` goes to
    `__call__` (gate [C, D], up_down [C, 2D], same dtype; x [D] float32, contiguous), `split` to one
    dense gemv over the stored [D, 2C] gate/up matrix followed by the down rows of the active neurons
    (hotcold.runtime.splitkernel: a compiled threshold-and-sum for the product rule, embedding_bag
    otherwise).
    """

    def __init__(self, dim: int, backend: str = "auto", threads: int | None = None, group: int | None = None,
                 dynamic: bool | None = None, activation: str = "silu"):
        self.backend = resolve_backend(backend)
        if activation != "silu" and self.backend == "numba":
            if backend == "numba":
                from hotcold.errors import InputError

                raise InputError("the numba cold kernel computes SiLU gates only", "use --cpu-kernel torch")
            self.backend = "torch"
        self.activation = activation
        self._act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.relu
        self.group = default_group() if group is None else int(group)
        self.dynamic = default_dynamic() if dynamic is None else bool(dynamic)
        self._ctr = np.zeros(1, dtype=np.int64)
        self._no_counts = np.zeros(0, dtype=np.float32)
        if self.group not in GROUPS:
            from hotcold.errors import InputError

            raise InputError(f"cold kernel group {self.group} is not supported", f"use one of {GROUPS}")
        self.dim = dim
        self.threads = threads
        self.y = torch.zeros(dim, dtype=torch.float32)
        self._parts: np.ndarray | None = None
        self._split = None
        if self.backend == "numba":
            import numba

            numba.set_num_threads(min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
            self._parts = np.zeros((numba.get_num_threads(), dim + 1), dtype=np.float32)

    @property
    def name(self) -> str:
        return self.backend

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile (numba) for `dtype` on a tiny problem, so timing never includes the JIT."""
        D = self.dim
        g = torch.zeros(2, D, dtype=dtype)
        ud = torch.zeros(2, 2 * D, dtype=dtype)
        x = torch.zeros(D)
        act = torch.zeros(2, dtype=torch.uint8)
        for mode in MODES:
            for rule in RULES if mode == "threshold" else ("gate",):
                self(x, g, ud, mode, mask=torch.ones(2, dtype=torch.uint8), thr=0.0, active=act, rule=rule)
        if self.backend == "numba":
            gather, scatter = _numba_rows()
            a = _u16(ud)
            gather(a, np.zeros(1, np.int64), a[:1].copy())
            scatter(a.copy(), np.zeros(1, np.int64), a[:1].copy())

    def run(self, layer: Any, x: torch.Tensor, mode: str, *, rule: str = "gate", mask: torch.Tensor | None = None,
            thr: float = 0.0, active: torch.Tensor | None = None, out: torch.Tensor | None = None,
            counts: np.ndarray | None = None) -> ColdResult:
        """One layer's cold partial sum for a CpuLayer (hotcold.runtime.model) in either layout."""
        if layer.gate is not None:
            return self(x, layer.gate, layer.up_down, mode, mask=mask, thr=thr, active=active, out=out,
                        counts=counts, rule=rule)
        return self._split_layout(layer, x, mode, rule, mask, thr, active, out, counts)

    def __call__(self, x: torch.Tensor, gate: torch.Tensor, up_down: torch.Tensor, mode: str, *,
                 mask: torch.Tensor | None = None, thr: float = 0.0, active: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, counts: np.ndarray | None = None, rule: str = "gate") -> ColdResult:
        """The bundled layout. mask: uint8 [C], nonzero = compute this slot (predictor mode); active: uint8
        [C] flags out (in predictor mode the mask itself: pass the same tensor or none); out: float32 [D]
        for y; counts: float32 [C], += 1 where a slot was active (counted inside the numba kernel, which
        touches only the active slots, rather than by a second pass over all C slots)."""
        import time

        C, D = gate.shape
        y = self.y if out is None else out
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}")
        if rule not in RULES:
            raise ValueError(f"rule {rule!r}")
        if mode == "predictor" and mask is None:
            raise ValueError("predictor mode needs a mask")
        kmode = "product" if mode == "threshold" and rule == "product" else mode
        if active is None:
            active = mask if mode == "predictor" else torch.zeros(C, dtype=torch.uint8)
        t0 = time.perf_counter()
        if C == 0:
            y.zero_()
            n = 0
        elif self.backend == "numba":
            fn = _numba_kernels(_KIND[gate.dtype], self.group, self.dynamic)
            m = mask if mask is not None else active
            n = fn(x.numpy(), _u16(gate), _u16(up_down), m.numpy(), np.float32(thr), _MODE_ID[kmode],
                   self._parts, y.numpy(), active.numpy(), self._ctr,
                   self._no_counts if counts is None else counts)
        else:
            n = self._torch(x, gate, up_down, kmode, mask, thr, active, y)
            if counts is not None:
                counts += active.numpy()
        dt = time.perf_counter() - t0
        es = gate.element_size()
        if kmode == "threshold":
            nbytes = C * D * es + n * 2 * D * es
        elif kmode == "product":
            nbytes = C * 2 * D * es + n * D * es
        elif kmode == "exact":
            nbytes = C * 3 * D * es
        else:
            nbytes = n * 3 * D * es
        return ColdResult(y=y, n_active=int(n), seconds=dt, bytes_read=int(nbytes))

    def _torch(self, x, gate, up_down, mode, mask, thr, active, y) -> int:
        # float32 arithmetic on upcast rows, like the numba kernel (this path is for small shapes)
        D = gate.shape[1]
        act = self._act
        if mode == "predictor":
            idx = mask.nonzero().flatten()
            g = gate.index_select(0, idx).float() @ x
        elif mode == "product":
            a = act(gate.float() @ x) * (up_down[:, :D].float() @ x)
            idx = (a.abs() > thr).nonzero().flatten()
            y.copy_(a.index_select(0, idx) @ up_down.index_select(0, idx)[:, D:].float())
            active.zero_()
            active[idx] = 1
            return int(idx.numel())
        else:
            g = gate.float() @ x
            idx = None
            if mode == "threshold":
                idx = (act(g).abs() > thr).nonzero().flatten()
                g = g.index_select(0, idx)
        rows = (up_down if idx is None else up_down.index_select(0, idx)).float()
        a = act(g) * (rows[:, :D] @ x)
        y.copy_(a @ rows[:, D:])
        if idx is None:
            active.fill_(1)
            return gate.shape[0]
        if active is not mask:
            active.zero_()
            active[idx] = 1
        return int(idx.numel())

    def _split_layout(self, layer, x, mode, rule, mask, thr, active, out, counts) -> ColdResult:
        import time

        from hotcold.runtime.splitkernel import get_kernel

        if self._split is None:
            self._split = get_kernel("auto")
        C, D = layer.n_cold, self.dim
        y = self.y if out is None else out
        t0 = time.perf_counter()
        w = layer.gate_up_t
        es = w.element_size()
        if C == 0:
            y.zero_()
            return ColdResult(y=y, n_active=0, seconds=0.0, bytes_read=0)
        gu = (x.view(1, D).to(w.dtype) @ w)[0]  # [2C]: the stored [D, 2C] matrix streamed once
        s = self._act(gu[:C].float())
        a = s * gu[C:].float()
        rows = layer.down
        if mode == "exact":
            y.copy_((a.to(rows.dtype) @ rows).float())
            n = C
            if active is not None:
                active.fill_(1)
        elif mode == "threshold" and rule == "product" and counts is None and active is None:
            part, n = self._split.threshold_down(a if rows.dtype == torch.float32 else a.to(rows.dtype), thr, rows)
            y.copy_(part[0].float())
        else:
            if mode == "predictor":
                on = mask.bool()
            else:
                on = (s if rule == "gate" else a).abs() > thr
            idx = on.nonzero().squeeze(1)
            n = int(idx.numel())
            y.copy_(self._split.down(a.index_select(0, idx).to(rows.dtype), idx, _ZERO_OFF, rows)[0].float())
            if active is not None and active is not mask:
                active.copy_(on.to(torch.uint8))
            if counts is not None:
                counts += on.numpy()
        nbytes = C * 2 * D * es + n * D * rows.element_size()
        return ColdResult(y=y, n_active=int(n), seconds=time.perf_counter() - t0, bytes_read=int(nbytes))


_ZERO_OFF = torch.zeros(1, dtype=torch.long)


def gather_rows(src: torch.Tensor, idx: np.ndarray, dst: torch.Tensor, backend: str) -> None:
    """dst[i] = src[idx[i]] for CPU tensors (parallel with numba)."""
    if backend == "numba" and src.dtype in _KIND:
        _numba_rows()[0](_u16(src), np.ascontiguousarray(idx, dtype=np.int64), _u16(dst))
    else:
        torch.index_select(src, 0, torch.from_numpy(np.asarray(idx, dtype=np.int64)), out=dst)


def scatter_rows(dst: torch.Tensor, idx: np.ndarray, src: torch.Tensor, backend: str) -> None:
    """dst[idx[i]] = src[i] for CPU tensors."""
    if backend == "numba" and dst.dtype in _KIND:
        _numba_rows()[1](_u16(dst), np.ascontiguousarray(idx, dtype=np.int64), _u16(src))
    else:
        dst[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = src
