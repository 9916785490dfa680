"""Probe: an AVX-512 C predictor-mode q4 cold FFN (q4v.c) against the numba kernel, one 70B-shaped cold
layer (D 8192, 22,938 cold rows), at 10% and 45% selected, 8 and 16 threads. Writes $OUT/q4probe.json."""
import ctypes, json, os, subprocess, sys, time
from pathlib import Path

import numba
import numpy as np
import torch

here = Path(__file__).parent
out = Path(os.environ.get("OUT", "."))
so = out / "q4v.so"
subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(here / "q4v.c"), "-o", str(so)], check=True)
from hotcold.quant import dequantize, hcat, parse_format, random_qtensor  # noqa: E402
from hotcold.runtime.qkernels import QColdKernel  # noqa: E402

fmt = parse_format("q4"); D = 8192; C = 22938
dev = "cuda" if torch.cuda.is_available() else "cpu"
gate = random_qtensor(C, D, fmt, seed=1, device=dev).to("cpu")
ud = hcat(random_qtensor(C, D, fmt, seed=2, device=dev), random_qtensor(C, D, fmt, seed=3, device=dev)).to("cpu")
x = torch.randn(D)
lib = ctypes.CDLL(str(so)); f = lib.hc_q4_predictor; f.restype = ctypes.c_int64
P, I = ctypes.c_void_p, ctypes.c_int64
g, u, xn = gate.packed.numpy(), ud.packed.numpy(), x.numpy()
res = {"cpu": subprocess.run(["bash", "-c", "lscpu | grep -E 'Model name|^CPU\\(s\\)|Thread|Core|Socket|Flags' | cut -c1-2000"],
                             capture_output=True, text=True).stdout, "runs": []}
for dens in (0.1, 0.45):
    mask = (torch.rand(C, generator=torch.Generator().manual_seed(0)) < dens).to(torch.uint8); m = mask.numpy()
    sel = mask.nonzero().flatten()
    G = dequantize(gate.take_rows(sel)).double(); U = dequantize(ud.take_rows(sel)).double()
    a = torch.nn.functional.silu(G @ x.double()) * (U[:, :D] @ x.double()); ref = (a @ U[:, D:]).numpy()
    for T in sorted({min(t, numba.config.NUMBA_NUM_THREADS) for t in (8, 16)}):
        numba.set_num_threads(T)
        y = np.zeros(D, np.float32); idx = np.zeros(C, np.int32); scratch = np.zeros(T * (D + 5 * (D // 32)), np.float32)
        def c_run():
            return f(P(g.ctypes.data), I(g.shape[1]), P(u.ctypes.data), I(u.shape[1]), P(m.ctypes.data), I(C),
                     P(xn.ctypes.data), I(D), P(y.ctypes.data), P(idx.ctypes.data), P(scratch.ctypes.data), ctypes.c_int(T))
        k = QColdKernel(D, backend="numba", threads=T); k.warm_up(fmt)
        def nb_run():
            return k(x, gate, ud, "predictor", mask=mask).n_active
        n = c_run(); err_c = float(np.abs(y - ref).max() / np.abs(ref).max())
        nb_run(); err_n = float(np.abs(k.y.numpy() - ref).max() / np.abs(ref).max())
        byt = n * (g.shape[1] + u.shape[1])
        ms = {"c": [], "numba": []}
        for _ in range(5):
            for name, fn in (("c", c_run), ("numba", nb_run)):
                t = time.perf_counter()
                for _ in range(10):
                    fn()
                ms[name].append((time.perf_counter() - t) / 10 * 1e3)
        r = {"density": dens, "threads": T, "selected": int(n), "bytes": int(byt), "err_c": err_c, "err_numba": err_n,
             **{f"{k_}_ms_median": float(np.median(v)) for k_, v in ms.items()},
             **{f"{k_}_GBps": float(byt / np.median(v) / 1e6) for k_, v in ms.items()}}
        r["c_over_numba"] = r["numba_ms_median"] / r["c_ms_median"]
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
(out / "q4probe.json").write_text(json.dumps(res, indent=1))
