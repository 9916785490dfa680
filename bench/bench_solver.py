"""Solver benchmark at LLaMA-70B shape (80 layers × 28672 neurons) on a synthetic profile.

Times `hotcold.solver.solve()` (the library entry point, from a loaded Profile to a Placement in memory)
for fixed, impact and adaptive under several budgets and cold-neuron modes, on the H200 preset. Each
case is run `--repeat` times after one warm-up run; the JSON has the first (cold) time, the median of
the warm ones, the solver status and gap, the MILP size before and after the Lagrangian reduction, and
the modelled latency. One case is also solved with the unreduced MILP (every block a binary) to show
the reduction's value and that both give the same optimum.

    python bench/bench_solver.py [--out bench/bench_solver.json] [--repeat 3] [--no-full] [--solver cbc|highs]
                                 [--preset h200|h200-decode]

Restricted to 2 cores of an idle machine (the JSON records `cpus_usable`):

    PYTHONPATH=. taskset -c 0,1 python bench/bench_solver.py --out bench/bench_solver_h200host_2cores.json

The profile is synthetic (hotcold.solver.synth: per-layer log-normal frequencies, 65536 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

CASES = [
    # name, solve() keyword arguments
    ("threshold 48GiB", dict(gpu_budget="48GiB", cpu_budget="110GiB", cold_mode="threshold")),
    ("threshold 96GiB", dict(gpu_budget="96GiB", cpu_budget="110GiB", cold_mode="threshold")),
    ("predictor 48GiB", dict(gpu_budget="48GiB", cpu_budget="110GiB", cold_mode="predictor")),
    ("predictor 130GiB (GPU side binds)", dict(gpu_budget="130GiB", cpu_budget="110GiB", cold_mode="predictor")),
    ("predictor 130GiB, CPU budget 40GiB binds", dict(gpu_budget="130GiB", cpu_budget="40GiB", cold_mode="predictor")),
]
POLICIES = ("fixed", "impact", "adaptive")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-full", action="store_true", help="skip the unreduced MILP comparison")
    ap.add_argument("--solver", default="auto", help="MILP backend: auto (HiGHS if installed, else CBC), cbc, highs")
    ap.add_argument("--mip-gap", type=float, default=1e-4, help="relative MIP gap (the issue accepts 1e-3)")
    ap.add_argument("--preset", default="h200", help="hardware preset (h200: the issue's raw rates; h200-decode)")
    args = ap.parse_args()

    import numpy as np
    import pulp

    from hotcold.model.config import SHAPES
    from hotcold.solver.solve import solve
    from hotcold.solver.synth import synthetic_profile

    cfg = SHAPES["llama2-70b"]
    t0 = time.perf_counter()
    prof = synthetic_profile(cfg, seed=args.seed, tokens=65536)
    gen_s = time.perf_counter() - t0
    print(f"synthetic 70B profile in {gen_s:.2f} s; load average {os.getloadavg()}", file=sys.stderr)
    load_start = os.getloadavg()

    results = []
    for name, kw in CASES:
        for pol in POLICIES:
            times = []
            pl = None
            for _ in range(args.repeat + 1):
                t = time.perf_counter()
                pl = solve(prof, args.preset, policy=pol, group_size=args.group_size, ctx_len=4096,
                           solver=args.solver, mip_gap=args.mip_gap, **kw)
                times.append(time.perf_counter() - t)
            s = pl.manifest["solver"]
            row = {"case": name, "policy": pol, **kw, "group_size": args.group_size,
                   "first_s": times[0], "median_s": statistics.median(times[1:]), "runs_s": times,
                   "status": s["status"], "gap": s["gap"], "backend": s["backend"],
                   "blocks": s.get("blocks"), "free_blocks": s.get("free_blocks"), "int_vars": s.get("int_vars"),
                   "modelled_ms_per_token": pl.totals["modelled_ms_per_token"],
                   "hot_fraction": pl.totals["hot_fraction"], "gpu_share": pl.totals["gpu_share"],
                   "gpu_bytes": pl.totals["gpu_bytes"], "cpu_bytes": pl.totals["cpu_bytes"],
                   "regimes": _count(x["regime"] for x in pl.layers)}
            results.append(row)
            print(f"{name:38s} {pol:8s} {row['median_s']:.3f} s (first {row['first_s']:.3f}) {row['status']:8s} "
                  f"gap {row['gap']:.1e} {row['modelled_ms_per_token']:8.2f} ms/token  hot {row['hot_fraction']:.3f}"
                  f"  free blocks {row['free_blocks']}/{row['blocks']}, MILP integers {row['int_vars']}", file=sys.stderr)

    full = None
    if not args.no_full:
        name, kw = CASES[0]
        t = time.perf_counter()
        red = solve(prof, args.preset, policy="adaptive", group_size=args.group_size, ctx_len=4096,
                    solver=args.solver, **kw)
        t_red = time.perf_counter() - t
        t = time.perf_counter()
        unr = solve(prof, args.preset, policy="adaptive", group_size=args.group_size, ctx_len=4096, reduce=False,
                    time_limit=600, solver=args.solver, **kw)
        t_full = time.perf_counter() - t
        full = {"case": name, "reduced_s": t_red, "unreduced_s": t_full,
                "reduced_objective_us": red.manifest["solver"]["objective"],
                "unreduced_objective_us": unr.manifest["solver"]["objective"],
                "unreduced_status": unr.manifest["solver"]["status"], "unreduced_gap": unr.manifest["solver"]["gap"],
                "same_placement": bool((red.n_hot == unr.n_hot).all())}
        print(f"unreduced MILP: {t_full:.2f} s vs reduced {t_red:.2f} s; objectives "
              f"{full['unreduced_objective_us']:.3f} / {full['reduced_objective_us']:.3f} µs", file=sys.stderr)

    out = {
        "benchmark": "solver at LLaMA-70B shape",
        "command": " ".join(["python"] + sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(),
                    "numpy": np.__version__, "pulp": pulp.__version__,
                    "solvers": pulp.listSolvers(onlyAvailable=True)},
        "model": {"shape": cfg.name, "n_layers": cfg.n_layers, "n_ff": cfg.n_ff, "dtype": "float16", "ctx_len": 4096},
        "profile": {"kind": "synthetic (hotcold.solver.synth)", "seed": args.seed, "tokens": 65536,
                    "generation_s": gen_s},
        "hardware": f"{args.preset} preset",
        "solver": args.solver,
        "timing": f"solve() from a loaded Profile, {args.repeat} warm runs after one cold run; default "
                  f"time limit (10 s), MIP gap {args.mip_gap:g}",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "results": results,
        "unreduced_comparison": full,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def _count(items) -> dict[str, int]:
    d: dict[str, int] = {}
    for x in items:
        d[x] = d.get(x, 0) + 1
    return d


if __name__ == "__main__":
    main()
