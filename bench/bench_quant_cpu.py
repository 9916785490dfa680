"""The quantized cold kernel (hotcold.runtime.qkernels) against the fp16 one (hotcold.runtime.coldkernel)
on this machine, at one moderate shape, interleaved in one process.

    python bench/bench_quant_cpu.py --dim 4096 --cold 8192 --repeats 15 --out bench/results/quant_cpu.json

Synthetic: random weights (fp16, and the same weights quantized to q4 / q8), random x; predictor mode
selects a fixed random `--density` of the slots, threshold mode uses the threshold that makes that
density on x. Per mode, each repeat runs every format once in a rotating order (so drift from other
jobs on the machine hits every format alike); the JSON keeps every sample and reports medians, effective
GB/s (bytes the call read, scales included, / seconds) and each format's speed-up over fp16 (time ratio
of the medians, and of the fastest samples), plus the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchkit import REPO, log  # bench/ is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=4096, help="model dimension D")
    ap.add_argument("--cold", type=int, default=8192, help="cold neurons C of the layer")
    ap.add_argument("--density", type=float, default=0.1, help="active fraction in threshold/predictor mode")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--group", type=int, default=4, help="neurons streamed side by side (both kernels)")
    ap.add_argument("--threads", type=int, default=1,
                    help="numba threads (1 by default: on a shared machine a parallel call lasts as long as its "
                         "most preempted thread, which measures the scheduler, not the kernel)")
    ap.add_argument("--formats", default="fp16,q4,q8", help="comma-separated: fp16 and hotcold.quant names")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quant_cpu.json"))
    args = ap.parse_args()

    import numba

    from hotcold import quant
    from hotcold.runtime.coldkernel import ColdKernel
    from hotcold.runtime.qkernels import QColdKernel

    C, D = args.cold, args.dim
    g = torch.Generator().manual_seed(0)
    gate16 = (torch.randn(C, D, generator=g) * 0.05).half()
    ud16 = (torch.randn(C, 2 * D, generator=g) * 0.05).half()
    x = torch.randn(D, generator=g)
    mask = (torch.rand(C, generator=g) < args.density).to(torch.uint8)
    s = torch.nn.functional.silu(gate16.float() @ x).abs()
    thr = float(s.kthvalue(max(1, int(round(C * (1 - args.density))))).values)

    kernels: dict[str, tuple] = {}
    for name in args.formats.split(","):
        if name == "fp16":
            k = ColdKernel(D, backend="numba", threads=args.threads, group=args.group, dynamic=True)
            kernels[name] = (k, gate16, ud16)
            log("compiling the fp16 kernel")
            k.warm_up(torch.float16)
        else:
            fmt = quant.parse_format(name)
            gq = quant.quantize(gate16.float(), fmt.bits, fmt.group, fmt.asym)
            udq = quant.quantize(ud16.float(), fmt.bits, fmt.group, fmt.asym)
            k = QColdKernel(D, backend="numba", threads=args.threads, group=args.group, dynamic=True)
            kernels[fmt.name] = (k, gq, udq)
            log(f"compiling the {fmt.name} kernel")
            k.warm_up(fmt)
    names = list(kernels)
    load_before = os.getloadavg()
    result: dict = {
        "command": " ".join([sys.executable, *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numba_threads": numba.get_num_threads(), "loadavg_before": load_before},
        "synthetic": "random weights and x; predictor mask random at --density; threshold set for --density",
        "shape": {"cold": C, "dim": D, "density": args.density, "group": args.group, "schedule": "dynamic"},
        "modes": {},
    }
    for mode in ("exact", "threshold", "predictor"):
        samples: dict[str, list] = {n: [] for n in names}
        nbytes: dict[str, int] = {}
        nact: dict[str, int] = {}
        for r in range(args.repeats + 1):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                k, gt, ud = kernels[n]
                act = mask.clone() if mode == "predictor" else torch.zeros(C, dtype=torch.uint8)
                res = k(x, gt, ud, mode, mask=mask, thr=thr, active=act)
                if r:  # the first round warms caches and page tables
                    samples[n].append(res.seconds)
                nbytes[n], nact[n] = res.bytes_read, res.n_active
        base = float(np.median(samples[names[0]]))
        base_min = float(np.min(samples[names[0]]))
        rows = {}
        for n in names:
            med, best = float(np.median(samples[n])), float(np.min(samples[n]))
            # the fastest sample is the one least disturbed by other jobs on a shared machine
            rows[n] = {"median_ms": med * 1e3, "min_ms": best * 1e3, "bytes_read": nbytes[n],
                       "gb_per_s": nbytes[n] / med / 1e9, "gb_per_s_best": nbytes[n] / best / 1e9, "active": nact[n],
                       "speedup_vs_" + names[0]: base / med, "speedup_best_vs_" + names[0]: base_min / best,
                       "samples_ms": [t * 1e3 for t in samples[n]]}
        result["modes"][mode] = rows
        log(mode + ": " + ", ".join(f"{n} {v['median_ms']:.2f} ms (best {v['min_ms']:.2f}) {v['gb_per_s']:.1f} GB/s "
                                    f"x{v['speedup_vs_' + names[0]]:.2f} (best x{v['speedup_best_vs_' + names[0]]:.2f})"
                                    for n, v in rows.items()))
    result["machine"]["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
