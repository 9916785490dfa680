"""The CPU cold kernel for predictor mode over symmetric INT4 rows (group 32), in C with AVX-512.

    y[D] = Σ_{j: mask[j]} silu(gate_j · x) · (up_j · x) · down_j

on the bundled layout of hotcold.runtime.qkernels (gate [C, D], up_down [C, 2D], codes then fp16 scales).
It replaces the numba kernel for this one case, the one the 4-bit hybrid decodes with: the numba kernel
widens each 4-bit code to float32 through scalar-shaped loops, this one unpacks 16 codes per instruction
(`_mm512_cvtepu8_epi32` on the low and the high nibbles of 16 bytes), keeps one vector accumulator per row
across the groups, reads a gate row and an up row against each x load, folds the −8 offset of every group
into one scalar per row (dot products) or per group (the down accumulator), and converts the fp16 scales
16 at a time. Threads take 8 selected slots at a time (OpenMP dynamic schedule) into their own
accumulators, summed at the end. Same float32 arithmetic as the numba kernel, in another order.

Built on first use like hotcold.runtime.ckernel (`cc -O3 -march=native -fopenmp`, under a second) into
$HOTCOLD_HOME/kernels, keyed by the source and the CPU; only on CPUs with AVX-512 F/BW (no compiler, no
AVX-512, or a failed build: `load()` returns None and the numba kernel runs). HOTCOLD_Q4_KERNEL=numba
turns it off.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <omp.h>
#include <immintrin.h>

/* q4 symmetric, group 32: a row is D/2 code bytes (group g: bytes 16g..16g+15; byte i holds value i in its
   low nibble and value 16+i in its high nibble), then D/32 fp16 scales; value = scale * (code - 8).
   up_down rows: up codes, down codes, up scales, down scales. */

static inline void scales_f32(const uint16_t *s, int64_t ng, float *out) {
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16) _mm512_storeu_ps(out + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g))));
    for (; g < ng; g++) out[g] = _cvtsh_ss(s[g]);
}

/* sum_g a[g] * b[g], 16 at a time */
static inline float vdot(const float *a, const float *b, int64_t n) {
    __m512 v = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= n; g += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(a + g), _mm512_loadu_ps(b + g), v);
    float r = _mm512_reduce_add_ps(v);
    for (; g < n; g++) r += a[g] * b[g];
    return r;
}

/* two rows against x at once: returns their dots (with the -8 offset folded in via xs) */
static inline void qdot2(const uint8_t *r0, const float *d0, const uint8_t *r1, const float *d1, const float *x,
                         const float *xs, int64_t ng, float *o0, float *o1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(15);
    float f0 = 0.f, f1 = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        __m512 xl = _mm512_loadu_ps(x + 32 * g), xh = _mm512_loadu_ps(x + 32 * g + 16);
        __m128i b0 = _mm_loadu_si128((const __m128i *)(r0 + 16 * g));
        __m128i b1 = _mm_loadu_si128((const __m128i *)(r1 + 16 * g));
        __m512 l0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b0, m4)));
        __m512 h0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b0, 4), m4)));
        __m512 l1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b1, m4)));
        __m512 h1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b1, 4), m4)));
        __m512 t0 = _mm512_fmadd_ps(h0, xh, _mm512_mul_ps(l0, xl));
        __m512 t1 = _mm512_fmadd_ps(h1, xh, _mm512_mul_ps(l1, xl));
        a0 = _mm512_fmadd_ps(t0, _mm512_set1_ps(d0[g]), a0);
        a1 = _mm512_fmadd_ps(t1, _mm512_set1_ps(d1[g]), a1);
    }
    f0 = vdot(d0, xs, ng);
    f1 = vdot(d1, xs, ng);
    *o0 = _mm512_reduce_add_ps(a0) - 8.f * f0;
    *o1 = _mm512_reduce_add_ps(a1) - 8.f * f1;
}

/* acc += a * row (codes only; the -8 offset goes to off[g] += -8 a d[g], added once at the end) */
static inline void qacc(const uint8_t *r, const float *d, float a, float *acc, float *off, int64_t ng) {
    const __m128i m4 = _mm_set1_epi8(15);
    for (int64_t g = 0; g < ng; g++) {
        float c = a * d[g];
        __m512 cv = _mm512_set1_ps(c);
        __m128i b = _mm_loadu_si128((const __m128i *)(r + 16 * g));
        __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m4)));
        __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m4)));
        float *p = acc + 32 * g;
        _mm512_storeu_ps(p, _mm512_fmadd_ps(l, cv, _mm512_loadu_ps(p)));
        _mm512_storeu_ps(p + 16, _mm512_fmadd_ps(h, cv, _mm512_loadu_ps(p + 16)));
        off[g] -= 8.f * c;
    }
}

/* acc += sum_i a[i] * row_i for four rows at once: the accumulator is loaded and stored once per group for
   the four (the one-row loop spends as many instructions on acc as on the codes). */
static inline void qacc4(const uint8_t *const *r, const float *const *d, const float *a, float *acc, float *off,
                         float *cv4, int64_t ng) {
    const __m128i m4 = _mm_set1_epi8(15);
    /* cv4[i][g] = a[i] d[i][g] (vector products up front; the loop broadcasts them from memory), and the -8
       offsets of the four rows into off */
    for (int i = 0; i < 4; i++) {
        __m512 av = _mm512_set1_ps(a[i]);
        int64_t g = 0;
        for (; g + 16 <= ng; g += 16) _mm512_storeu_ps(cv4 + i * ng + g, _mm512_mul_ps(av, _mm512_loadu_ps(d[i] + g)));
        for (; g < ng; g++) cv4[i * ng + g] = a[i] * d[i][g];
    }
    {
        const __m512 m8 = _mm512_set1_ps(-8.f);
        int64_t g = 0;
        for (; g + 16 <= ng; g += 16) {
            __m512 c = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(cv4 + g), _mm512_loadu_ps(cv4 + ng + g)),
                                     _mm512_add_ps(_mm512_loadu_ps(cv4 + 2 * ng + g), _mm512_loadu_ps(cv4 + 3 * ng + g)));
            _mm512_storeu_ps(off + g, _mm512_fmadd_ps(m8, c, _mm512_loadu_ps(off + g)));
        }
        for (; g < ng; g++) off[g] -= 8.f * ((cv4[g] + cv4[ng + g]) + (cv4[2 * ng + g] + cv4[3 * ng + g]));
    }
    for (int64_t g = 0; g < ng; g++) {
        float *p = acc + 32 * g;
        __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
        for (int i = 0; i < 4; i++) {
            __m512 cv = _mm512_set1_ps(cv4[i * ng + g]);
            __m128i b = _mm_loadu_si128((const __m128i *)(r[i] + 16 * g));
            lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m4))), cv, lo);
            hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m4))), cv, hi);
        }
        _mm512_storeu_ps(p, lo);
        _mm512_storeu_ps(p + 16, hi);
    }
}

/* predictor mode: slots j with mask[j] != 0; y[D] = sum_j silu(gate_j . x) (up_j . x) down_j.
   scratch: [nthreads, D + ng + 13*ng] floats. blocked: 1 = the down rows of four slots accumulated together
   (qacc4), 0 = one at a time (qacc). Returns the number of slots computed. */
int64_t hc_q4_predictor(const uint8_t *gate, int64_t gs, const uint8_t *ud, int64_t us, const uint8_t *mask, int64_t C,
                        const float *x, int64_t D, float *y, int32_t *idx, float *scratch, int nthreads, int blocked) {
    const int64_t ng = D / 32, nd = D / 2;
    int64_t n = 0;
    for (int64_t j = 0; j < C; j++) if (mask[j]) idx[n++] = (int32_t)j;
    const int64_t W = D + 14 * ng;
    float xs_buf[4096];
    for (int64_t g = 0; g < ng; g++) { float v = 0; for (int i = 0; i < 32; i++) v += x[32 * g + i]; xs_buf[g] = v; }
    const float *xs = xs_buf;
    #pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num();
        float *acc = scratch + (int64_t)t * W, *off = acc + D, *dg = off + ng, *du = dg + ng;
        memset(acc, 0, (D + ng) * sizeof(float));
        if (!blocked) {
            float *dd = du + ng;
            #pragma omp for schedule(dynamic, 8)
            for (int64_t k = 0; k < n; k++) {
                int64_t j = idx[k];
                const uint8_t *gr = gate + j * gs, *ur = ud + j * us;
                scales_f32((const uint16_t *)(gr + nd), ng, dg);
                scales_f32((const uint16_t *)(ur + 2 * nd), 2 * ng, du);  /* up's then down's: dd = du + ng */
                float g, u;
                qdot2(gr, dg, ur, du, x, xs, ng, &g, &u);
                float s = g / (1.f + expf(-g));
                qacc(ur + nd, dd, s * u, acc, off, ng);
            }
        } else {
            /* du holds four slots' up and down scales: [4][2 ng] */
            #pragma omp for schedule(dynamic, 2)
            for (int64_t kb = 0; kb < (n + 3) / 4; kb++) {
                const uint8_t *rows[4];
                const float *ds[4];
                float a[4];
                for (int i = 0; i < 4; i++) {
                    int64_t k = 4 * kb + i;
                    float *dui = du + (int64_t)i * 2 * ng;
                    ds[i] = dui + ng;
                    if (k >= n) { rows[i] = rows[0]; ds[i] = ds[0]; a[i] = 0.f; continue; }  /* a 0 adds nothing */
                    int64_t j = idx[k];
                    const uint8_t *gr = gate + j * gs, *ur = ud + j * us;
                    scales_f32((const uint16_t *)(gr + nd), ng, dg);
                    scales_f32((const uint16_t *)(ur + 2 * nd), 2 * ng, dui);
                    float g, u;
                    qdot2(gr, dg, ur, dui, x, xs, ng, &g, &u);
                    a[i] = g / (1.f + expf(-g)) * u;
                    rows[i] = ur + nd;
                }
                qacc4(rows, ds, a, acc, off, du + 8 * ng, ng);
            }
        }
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < ng; g++) {
        float o = 0.f;
        for (int t = 0; t < nthreads; t++) o += scratch[(int64_t)t * W + D + g];
        for (int i = 0; i < 32; i++) {
            float v = o;
            for (int t = 0; t < nthreads; t++) v += scratch[(int64_t)t * W + 32 * g + i];
            y[32 * g + i] = v;
        }
    }
    return n;
}
"""

_LIB: ctypes.CDLL | None = None
_TRIED = False
MAX_GROUPS = 4096  # x's per-group sums live on the stack: D <= 32 * 4096


def available_on_this_cpu() -> bool:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    have = set(flags.split(":", 1)[-1].split())
    return {"avx512f", "avx512bw", "f16c"} <= have


def load() -> ctypes.CDLL | None:
    """The compiled library (built once per machine and source), or None where it cannot be used."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("HOTCOLD_Q4_KERNEL", "auto") == "numba" or not available_on_this_cpu():
        return None
    from hotcold.runtime.ckernel import compile_and_load

    lib = compile_and_load("q4_predictor", SOURCE)
    if lib is None:
        return None
    f = lib.hc_q4_predictor
    f.restype = ctypes.c_int64
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                  ctypes.c_int]
    _LIB = lib
    return lib


class Q4Predictor:
    """One process's kernel with its scratch (slot list, per-thread accumulators), reused across calls."""

    def __init__(self, lib: ctypes.CDLL, threads: int, blocked: bool = True):
        """blocked: the down rows of four slots accumulated together (False: one at a time, the first version)."""
        self.f = lib.hc_q4_predictor
        self.threads = max(1, int(threads))
        self.blocked = bool(blocked)
        self.idx = np.zeros(0, dtype=np.int32)
        self.scratch = np.zeros(0, dtype=np.float32)

    @staticmethod
    def handles(fmt, D: int) -> bool:
        return fmt.bits == 4 and not fmt.asym and fmt.group == 32 and D % 32 == 0 and D // 32 <= MAX_GROUPS

    def __call__(self, x: np.ndarray, gate: np.ndarray, up_down: np.ndarray, mask: np.ndarray, y: np.ndarray) -> int:
        """x float32 [D], gate uint8 [C, gate row bytes], up_down uint8 [C, up_down row bytes], mask uint8 [C]
        (all C-contiguous), y float32 [D] out. Returns the number of slots computed."""
        C, D = gate.shape[0], x.shape[0]
        if self.idx.shape[0] < C:
            self.idx = np.zeros(C, dtype=np.int32)
        need = self.threads * (D + 14 * (D // 32))
        if self.scratch.shape[0] < need:
            self.scratch = np.zeros(need, dtype=np.float32)
        return int(self.f(gate.ctypes.data, gate.shape[1], up_down.ctypes.data, up_down.shape[1], mask.ctypes.data, C,
                          x.ctypes.data, D, y.ctypes.data, self.idx.ctypes.data, self.scratch.ctypes.data, self.threads,
                          int(self.blocked)))
