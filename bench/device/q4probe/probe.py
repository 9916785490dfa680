"""Probe: the AVX-512 C predictor-mode q4 cold FFN (hotcold.runtime.cq4) against the numba kernel, one
70B-shaped cold layer (D 8192, 22,938 cold rows), at 10% and 45% selected, 8 and 16 threads, each against
a float64 reference. Writes $OUT/q4probe.json.    PYTHONPATH=. python3 bench/device/q4probe/probe.py"""
import json, os, subprocess, sys, time
from pathlib import Path

import numba
import numpy as np
import torch

out = Path(os.environ.get("OUT", "."))
from hotcold.quant import dequantize, hcat, parse_format, random_qtensor  # noqa: E402
from hotcold.runtime.qkernels import QColdKernel  # noqa: E402

fmt = parse_format("q4"); D = 8192; C = 22938
dev = "cuda" if torch.cuda.is_available() else "cpu"
gate = random_qtensor(C, D, fmt, seed=1, device=dev).to("cpu")
ud = hcat(random_qtensor(C, D, fmt, seed=2, device=dev), random_qtensor(C, D, fmt, seed=3, device=dev)).to("cpu")
x = torch.randn(D)
g, u = gate.packed.numpy(), ud.packed.numpy()
res = {"cpu": subprocess.run(["bash", "-c", "lscpu | grep -E 'Model name|^CPU\\(s\\)|Thread|Core|Socket|Flags' | cut -c1-2000"],
                             capture_output=True, text=True).stdout, "runs": []}
for dens in (0.1, 0.45):
    mask = (torch.rand(C, generator=torch.Generator().manual_seed(0)) < dens).to(torch.uint8); m = mask.numpy()
    sel = mask.nonzero().flatten()
    G = dequantize(gate.take_rows(sel)).double(); U = dequantize(ud.take_rows(sel)).double()
    a = torch.nn.functional.silu(G @ x.double()) * (U[:, :D] @ x.double()); ref = (a @ U[:, D:]).numpy()
    for T in sorted({min(t, numba.config.NUMBA_NUM_THREADS) for t in (8, 16)}):
        numba.set_num_threads(T)
        kc = QColdKernel(D, backend="numba", threads=T); kc.warm_up(fmt)
        if kc._q4 is None:
            sys.exit("the AVX-512 kernel did not build here (no compiler or no AVX-512 F/BW)")
        k = QColdKernel(D, backend="numba", threads=T); k.warm_up(fmt)
        k._q4 = None  # the numba kernel
        k1 = QColdKernel(D, backend="numba", threads=T); k1.warm_up(fmt)
        k1._q4.blocked = False  # the C kernel's first version: down rows one slot at a time

        def c1_run():
            return k1(x, gate, ud, "predictor", mask=mask).n_active

        def c_run():
            return kc(x, gate, ud, "predictor", mask=mask).n_active

        def nb_run():
            return k(x, gate, ud, "predictor", mask=mask).n_active
        n = c_run(); err_c = float(np.abs(kc.y.numpy() - ref).max() / np.abs(ref).max())
        nb_run(); err_n = float(np.abs(k.y.numpy() - ref).max() / np.abs(ref).max())
        byt = n * (g.shape[1] + u.shape[1])
        ms = {"c": [], "c_one_row": [], "numba": []}
        for _ in range(5):
            for name, fn in (("c", c_run), ("c_one_row", c1_run), ("numba", nb_run)):
                t = time.perf_counter()
                for _ in range(10):
                    fn()
                ms[name].append((time.perf_counter() - t) / 10 * 1e3)
        r = {"density": dens, "threads": T, "selected": int(n), "bytes": int(byt), "err_c": err_c, "err_numba": err_n,
             **{f"{k_}_ms_median": float(np.median(v)) for k_, v in ms.items()},
             **{f"{k_}_GBps": float(byt / np.median(v) / 1e6) for k_, v in ms.items()}}
        r["c_over_numba"] = r["numba_ms_median"] / r["c_ms_median"]
        r["four_row_over_one_row"] = r["c_one_row_ms_median"] / r["c_ms_median"]
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
(out / "q4probe.json").write_text(json.dumps(res, indent=1))
