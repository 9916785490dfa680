"""The CPU side's cold-neuron kernel: one fused pass over the row-bundled cold FFN rows.

Layout (the Bundle's, design.md §2): per layer, cold slot j holds neuron `cold_ids[j]` as
    gate    [C, D]       its gate row
    up_down [C, 2D]      its up row followed by its down column (row-column bundling)
so an active neuron is two contiguous reads (16 KB + 32 KB at LLaMA-70B shape in fp16).

For every slot j the kernel computes, with x [D] float32 and s = silu(gate_j · x):
    exact       every slot is active
    threshold   active iff |s| > t (CATS: decidable from the gate row alone; the up/down rows of an
                inactive neuron are never read)
    predictor   the slots whose `mask` byte is set (chosen on the GPU side) are active; no other
                row is read
and returns y = Σ_active s·(up_j · x)·down_j  [D] float32, the layer's CPU partial sum.

Two implementations with the same semantics:
- `numba` (when importable): in exact and threshold mode threads take slots strided (slot order is
  hottest-first, so contiguous chunks would give one thread all the dense work); in predictor mode each
  thread takes an equal share of the *active* slots (striding left the busiest of 16 threads ~15% above
  the mean, and the call lasts as long as its slowest thread); each keeps a private float32 accumulator of D
  values, then the partials are summed. Optionally (`prefetch`) each thread prefetches its next
  neuron's rows while computing the current one. Weights stay 16-bit in memory and are widened in registers:
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
_MODE_ID = {"exact": 0, "threshold": 1, "predictor": 2}
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
def _numba_kernels(kind: str, prefetch: bool = False) -> Any:
    """Compile the kernel for weights stored as `kind` (float16 | bfloat16 | float32).

    prefetch: issue software prefetches for the thread's next neuron while computing the current one
    (one per 64 elements of each row), so several DRAM streams are in flight per core.
    """
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

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

    @intrinsic
    def _prefetch(typingctx, arr, i, k):  # prefetch &arr[i, k] into all cache levels (llvm.prefetch)
        sig = types.void(arr, i, k)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            i64, i32 = ir.IntType(64), ir.IntType(32)
            st0 = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
            isz = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
            ii = builder.sext(args[1], i64) if args[1].type.width < 64 else args[1]
            kk = builder.sext(args[2], i64) if args[2].type.width < 64 else args[2]
            off = builder.add(builder.mul(ii, st0), builder.mul(kk, ir.Constant(i64, isz)))
            i8p = ir.IntType(8).as_pointer()
            ptr = builder.inttoptr(builder.add(builder.ptrtoint(ary.data, i64), off), i8p)
            name = "llvm.prefetch.p0" if str(i8p) == "ptr" else "llvm.prefetch.p0i8"
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                name)
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    if kind == "float16":
        widen = _h2f
    elif kind == "bfloat16":
        widen = _b2f
    else:
        @njit(inline="always")
        def widen(v):
            return v

    PF = prefetch
    CH = 64  # elements per chunk (one prefetch each); D is a multiple of 64 for every real model

    # reassociation lets LLVM vectorise the dot products; no 'ninf': exp(-g) may overflow to inf
    @njit(parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"}, nogil=True, cache=False)
    def cold_ffn(x, gate, up_down, mask, thr, mode, parts, y, active):
        """mode 0 exact, 1 threshold, 2 predictor (mask[j] != 0 selects slot j). Returns #active."""
        C = gate.shape[0]
        D = x.shape[0]
        T = parts.shape[0]
        chunked = PF and D % CH == 0
        for t in prange(T):
            acc = parts[t]
            for k in range(D):
                acc[k] = 0.0
            if mode == 2:
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
            cnt = 0
            for ii in range(n):
                j = mine[ii]
                jn = mine[ii + 1] if ii + 1 < n else j
                g = np.float32(0.0)
                if chunked:
                    for c in range(0, D, CH):
                        _prefetch(gate, jn, c)
                        for k in range(c, c + CH):
                            g += widen(gate[j, k]) * x[k]
                else:
                    for k in range(D):
                        g += widen(gate[j, k]) * x[k]
                s = g / (np.float32(1.0) + np.exp(-g))
                if mode == 1 and abs(s) <= thr:
                    active[j] = 0
                    continue
                u = np.float32(0.0)
                if chunked:
                    for c in range(0, D, CH):
                        _prefetch(up_down, jn, c)
                        for k in range(c, c + CH):
                            u += widen(up_down[j, k]) * x[k]
                else:
                    for k in range(D):
                        u += widen(up_down[j, k]) * x[k]
                a = s * u
                if chunked:
                    for c in range(0, D, CH):
                        _prefetch(up_down, jn, D + c)
                        for k in range(c, c + CH):
                            acc[k] += a * widen(up_down[j, D + k])
                else:
                    for k in range(D):
                        acc[k] += a * widen(up_down[j, D + k])
                active[j] = 1
                cnt += 1
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

    return cold_ffn, gather_rows, scatter_rows, numba.get_num_threads()


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

    Call with CPU tensors: gate [C, D], up_down [C, 2D] (same dtype), x [D] float32 (contiguous).
    """

    def __init__(self, dim: int, backend: str = "auto", threads: int | None = None, prefetch: bool | None = None):
        self.backend = resolve_backend(backend)
        self.prefetch = (os.environ.get("HOTCOLD_PREFETCH", "0") not in ("", "0")) if prefetch is None else prefetch
        self.dim = dim
        self.threads = threads
        self.y = torch.zeros(dim, dtype=torch.float32)
        self._parts: np.ndarray | None = None
        if self.backend == "numba":
            import numba

            numba.set_num_threads(min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
            self._parts = np.zeros((numba.get_num_threads(), dim + 1), dtype=np.float32)

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile (numba) for `dtype` on a tiny problem, so timing never includes the JIT."""
        D = self.dim
        g = torch.zeros(2, D, dtype=dtype)
        ud = torch.zeros(2, 2 * D, dtype=dtype)
        x = torch.zeros(D)
        act = torch.zeros(2, dtype=torch.uint8)
        for mode in MODES:
            self(x, g, ud, mode, mask=torch.ones(2, dtype=torch.uint8), thr=0.0, active=act)
        if self.backend == "numba":
            _, gather, scatter, _ = _numba_kernels(_KIND[dtype], False)  # gather_rows/scatter_rows' key
            a = _u16(ud)
            gather(a, np.zeros(1, np.int64), a[:1].copy())
            scatter(a.copy(), np.zeros(1, np.int64), a[:1].copy())

    def __call__(self, x: torch.Tensor, gate: torch.Tensor, up_down: torch.Tensor, mode: str, *,
                 mask: torch.Tensor | None = None, thr: float = 0.0, active: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> ColdResult:
        """mask: uint8 [C], nonzero = compute this slot (predictor mode); active: uint8 [C] flags out
        (in predictor mode the mask itself: pass the same tensor or none); out: float32 [D] for y."""
        import time

        C, D = gate.shape
        y = self.y if out is None else out
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}")
        if mode == "predictor" and mask is None:
            raise ValueError("predictor mode needs a mask")
        if active is None:
            active = mask if mode == "predictor" else torch.zeros(C, dtype=torch.uint8)
        t0 = time.perf_counter()
        if C == 0:
            y.zero_()
            n = 0
        elif self.backend == "numba":
            fn = _numba_kernels(_KIND[gate.dtype], self.prefetch)[0]
            m = mask if mask is not None else active
            n = fn(x.numpy(), _u16(gate), _u16(up_down), m.numpy(), np.float32(thr), _MODE_ID[mode],
                   self._parts, y.numpy(), active.numpy())
        else:
            n = self._torch(x, gate, up_down, mode, mask, thr, active, y)
        dt = time.perf_counter() - t0
        es = gate.element_size()
        if mode == "threshold":
            nbytes = C * D * es + n * 2 * D * es
        elif mode == "exact":
            nbytes = C * 3 * D * es
        else:
            nbytes = n * 3 * D * es
        return ColdResult(y=y, n_active=int(n), seconds=dt, bytes_read=int(nbytes))

    def _torch(self, x, gate, up_down, mode, mask, thr, active, y) -> int:
        # float32 arithmetic on upcast rows, like the numba kernel (this path is for small shapes)
        D = gate.shape[1]
        if mode == "predictor":
            idx = mask.nonzero().flatten()
            g = gate.index_select(0, idx).float() @ x
        else:
            g = gate.float() @ x
            idx = None
            if mode == "threshold":
                idx = (torch.nn.functional.silu(g).abs() > thr).nonzero().flatten()
                g = g.index_select(0, idx)
        rows = (up_down if idx is None else up_down.index_select(0, idx)).float()
        a = torch.nn.functional.silu(g) * (rows[:, :D] @ x)
        y.copy_(a @ rows[:, D:])
        if idx is None:
            active.fill_(1)
            return gate.shape[0]
        if active is not mask:
            active.zero_()
            active[idx] = 1
        return int(idx.numel())


def gather_rows(src: torch.Tensor, idx: np.ndarray, dst: torch.Tensor, backend: str) -> None:
    """dst[i] = src[idx[i]] for CPU tensors (parallel with numba)."""
    if backend == "numba" and src.dtype in _KIND:
        # the same cache key as the engine's kernel (prefetch=False): another key compiles all kernels again
        _numba_kernels(_KIND[src.dtype], False)[1](_u16(src), np.ascontiguousarray(idx, dtype=np.int64), _u16(dst))
    else:
        torch.index_select(src, 0, torch.from_numpy(np.asarray(idx, dtype=np.int64)), out=dst)


def scatter_rows(dst: torch.Tensor, idx: np.ndarray, src: torch.Tensor, backend: str) -> None:
    """dst[idx[i]] = src[i] for CPU tensors."""
    if backend == "numba" and dst.dtype in _KIND:
        _numba_kernels(_KIND[dst.dtype], False)[2](_u16(dst), np.ascontiguousarray(idx, dtype=np.int64), _u16(src))
    else:
        dst[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = src
