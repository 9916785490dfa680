"""The AVX-512 q4 predictor-mode cold kernel (hotcold.runtime.cq4): its down rows accumulated four slots at a
time (the default) against one at a time (the first version), on this machine, same data, same run.

    python bench/bench_cq4.py [--rows 12000] [--dim 8192] [--threads 1,2] [--reps 15] [--out bench/results/cq4_blocked_cpu.json]
        [--first-source FILE]   (a cq4.py of an earlier commit, e.g. `git show fb46ee1:hotcold/runtime/cq4.py`:
                                 its kernel timed too, as "first")

One 70B-wide cold layer of random q4 rows (codes uniform, scales 0.01), 10% and 45% of the slots selected;
--reps interleaved timings of each variant, median; GB/s = bytes of the selected rows (gate, up, down with their
scales) over the time. The two agree to float32 rounding (the largest relative difference is recorded).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from benchkit import REPO, log  # bench/ is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--first-source", default=None, help="a cq4.py of an earlier commit: its kernel timed beside")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cq4_blocked_cpu.json"))
    args = ap.parse_args()
    from hotcold.runtime import cq4

    lib = cq4.load()
    if lib is None:
        sys.exit("the AVX-512 q4 kernel does not build here (needs AVX-512 F/BW and a C compiler)")
    first = None
    if args.first_source:
        import ctypes
        import importlib.util

        from hotcold.runtime.ckernel import compile_and_load

        spec = importlib.util.spec_from_file_location("cq4_first", args.first_source)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        first = compile_and_load("q4_predictor_first", mod.SOURCE).hc_q4_predictor
        first.restype = ctypes.c_int64
        first.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int]
    D, C = args.dim, args.rows
    gb, udb = D // 2 + 2 * (D // 32), D + 4 * (D // 32)
    rng = np.random.default_rng(0)
    g = rng.integers(0, 255, (C, gb), dtype=np.uint8)
    u = rng.integers(0, 255, (C, udb), dtype=np.uint8)
    g[:, D // 2:] = np.frombuffer(np.full((C, D // 32), 0.01, np.float16).tobytes(), np.uint8).reshape(C, -1)
    u[:, D:] = np.frombuffer(np.full((C, 2 * (D // 32)), 0.01, np.float16).tobytes(), np.uint8).reshape(C, -1)
    x = rng.standard_normal(D).astype(np.float32)
    runs = []
    for T in [int(t) for t in args.threads.split(",")]:
        for frac in (0.1, 0.45):
            m = (rng.random(C) < frac).astype(np.uint8)
            ks = {b: cq4.Q4Predictor(lib, T, blocked=b) for b in (False, True)}
            ys = {b: np.zeros(D, np.float32) for b in (False, True, "first")}
            fns = {b: (lambda b=b: ks[b](x, g, u, m, ys[b])) for b in ks}
            if first is not None:
                idx, scr = np.zeros(C, np.int32), np.zeros(T * (D + 5 * (D // 32)), np.float32)
                fns["first"] = lambda: first(g.ctypes.data, gb, u.ctypes.data, udb, m.ctypes.data, C, x.ctypes.data, D,
                                             ys["first"].ctypes.data, idx.ctypes.data, scr.ctypes.data, T)
            for fn in fns.values():
                fn()
            diff = float(np.abs(ys[True] - ys[False]).max() / np.abs(ys[False]).max())
            t: dict = {b: [] for b in fns}
            n = 0
            for _ in range(args.reps):
                for b, fn in fns.items():
                    t0 = time.perf_counter()
                    n = fn()
                    t[b].append(time.perf_counter() - t0)
            gbps = {b: n * (gb + udb) / float(np.median(v)) / 1e9 for b, v in t.items()}
            r = {"threads": T, "selected_fraction": frac, "selected": int(n), "one_row_GBps": gbps[False],
                 "four_row_GBps": gbps[True], "four_over_one": gbps[True] / gbps[False], "max_rel_diff": diff}
            if first is not None:
                r.update(first_GBps=gbps["first"], four_over_first=gbps[True] / gbps["first"],
                         max_rel_diff_first=float(np.abs(ys[True] - ys["first"]).max() / np.abs(ys["first"]).max()))
            runs.append(r)
            log(f"threads {T}, {frac:.0%} selected: one row {gbps[False]:.2f} GB/s, four rows {gbps[True]:.2f} GB/s "
                f"({r['four_over_one']:.3f}x), max relative difference {diff:.1e}"
                + (f"; first version {r['first_GBps']:.2f} GB/s ({r['four_over_first']:.3f}x)" if first is not None else ""))
    res = {"command": " ".join([sys.executable, *sys.argv]), "machine": platform.processor() or platform.machine(),
           "rows": C, "dim": D, "runs": runs,
           "note": "random q4 rows; a CPU microbenchmark of this machine, not the H200 host"}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
