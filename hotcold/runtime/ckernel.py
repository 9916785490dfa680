"""A compiled CPU kernel for decoding in `threshold` mode (the `c` kernel of kernels.py).

    threshold_down(a [c] fp32, t, rows [c, D] fp32) -> (y [1, D], m):  y = Σ_{j: |a_j| > t} a_j · rows[j]

One call replaces hardshrink -> nonzero -> index_select -> embedding_bag: it selects the active
neurons and sums their down rows in place, splitting the active rows over the threads (each thread reads
whole contiguous rows into its own accumulator; the accumulators are added at the end). Measured on the
2-core dev machine (30 SmolLM2 layers, 50% of 1536 rows active): 3.8 ms vs 4.9 ms for the torch ops and
8.9 ms for a dense gemv over every row.

Built on first use with the system C compiler (`cc -O3 -march=native -fopenmp`, well under a second) into
$HOTCOLD_HOME/kernels (default ~/.cache/hotcold/kernels), keyed by the source and the CPU, and loaded with
ctypes. It links `libgomp.so.1`, the OpenMP runtime torch itself loads, so both share one thread pool.
No compiler, or a failed build: `load()` returns None and the runtime uses the torch kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <omp.h>

/* y[D] = sum over j with |a_j| > t of a_j * rows[j, :]; returns the number of such j.
   idx, w: scratch [c]; acc: scratch [nthreads, D] (used when nthreads > 1) */
int64_t hc_threshold_down(const float *a, int64_t c, float t, const float *rows, int64_t D, float *y,
                          int32_t *idx, float *w, float *acc, int nthreads) {
    int64_t m = 0;
    for (int64_t j = 0; j < c; j++) {
        float v = a[j];
        if (fabsf(v) > t) { idx[m] = (int32_t)j; w[m] = v; m++; }
    }
    if (nthreads < 1 || m < 64 * (int64_t)nthreads) nthreads = 1;
    float *out = nthreads == 1 ? y : acc;
    for (int64_t d = 0; d < nthreads * D; d++) out[d] = 0.0f;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        int64_t lo = m * tid / nt, hi = m * (tid + 1) / nt;
        float *acc_t = out + (int64_t)tid * D;
        for (int64_t k = lo; k < hi; k++) {
            const float *r = rows + (int64_t)idx[k] * D;
            float wk = w[k];
            if (k + 1 < hi) __builtin_prefetch(rows + (int64_t)idx[k + 1] * D);
            for (int64_t d = 0; d < D; d++) acc_t[d] += wk * r[d];
        }
    }
    if (nthreads > 1) {
        for (int64_t d = 0; d < D; d++) {
            float s = 0.0f;
            for (int i = 0; i < nthreads; i++) s += acc[(int64_t)i * D + d];
            y[d] = s;
        }
    }
    return m;
}
"""

_LIB: ctypes.CDLL | None = None
_TRIED = False


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), *lines])


def _build(path: Path, source: str = SOURCE) -> None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "k.c"
        src.write_text(source)
        so = Path(tmp) / path.name
        subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(so), str(src)],
                       check=True, capture_output=True, timeout=120)
        os.replace(so, path)  # atomic: concurrent builders leave one complete file


def compile_and_load(name: str, source: str) -> ctypes.CDLL | None:
    """`source` built once per machine and source into $HOTCOLD_HOME/kernels/NAME-KEY.so and loaded, or None
    where it cannot be built (no compiler, a failed build)."""
    from hotcold.model.registry import home

    key = hashlib.sha256((source + _cpu_key()).encode()).hexdigest()[:16]
    path = home() / "kernels" / f"{name}-{key}.so"
    try:
        if not path.is_file():
            _build(path, source)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None


def load() -> ctypes.CDLL | None:
    """The compiled library (built once per machine), or None where it cannot be built."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    lib = compile_and_load("threshold_down", SOURCE)
    if lib is None:
        return None
    f = lib.hc_threshold_down
    f.restype = ctypes.c_int64
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    _LIB = lib
    return lib


class Scratch:
    """Buffers reused across calls (index and weight lists, per-thread accumulators)."""

    def __init__(self):
        self.c = self.D = self.p = -1

    def get(self, c: int, D: int, p: int):
        if c > self.c or D * p > self.D * self.p:
            self.c, self.D, self.p = max(c, self.c), D, p
            self.idx = torch.empty(self.c, dtype=torch.int32)
            self.w = torch.empty(self.c, dtype=torch.float32)
            self.acc = torch.empty(p * D, dtype=torch.float32)
        return self.idx, self.w, self.acc
