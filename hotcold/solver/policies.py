"""Placement policies (design.md §4): fixed τ, PowerInfer's impact ILP, and the adaptive latency MILP.

All three choose, per layer l, how many of the layer's neurons (sorted by frequency, descending) are hot:
within a layer every neuron costs the same bytes and a hotter neuron saves at least as much time on the
GPU, so some prefix of that order is always optimal, and a placement is one count per layer.

The ILPs work on *blocks*: layer l's sorted neurons cut into groups of `group_size`; with C_l enforced
the first block is C_l rounded up to whole groups (the layer has no hot neuron or at least C_l). Binary
x_{l,j} = "block j of layer l is hot", with the prefix structure x_{l,j+1} ≤ x_{l,j}.

    impact    max Σ f of hot neurons             s.t. budgets
    adaptive  min Σ_l (T_pre + z_l + (T_sync + T_host)·(1 − x_{l,last}))
              s.t. z_l ≥ T_gpu,l(x), z_l ≥ T_cpu,l(x)      (z_l ≥ T_gpu + T_cpu on one memory bus), budgets
              ("epigraph" form, as design.md writes it). The default "incremental" form has the same binaries
              and gives x_{l,j} the change in T_l that block j makes, T_l(k+1) − T_l(k), max and sync included:
              equal on every prefix-ordered x, and its LP relaxation is each layer's convex hull, which
              CBC closes much faster. Tests solve both and check they agree.

Budgets: every neuron has the same bytes on either side, so the GPU budget is "at most K_hi hot neurons"
and the CPU budget "at least K_lo hot neurons", after the dense tensors (hotcold.memory) are placed.

Size. At LLaMA-70B shape that is 80 × 448 binaries; building and solving all of them through PuLP takes
several seconds. Before the MILP, a Lagrangian relaxation of the one coupling constraint (Σ hot neurons)
gives a lower bound LB and, repaired greedily, a feasible placement UB. Any choice in a layer whose
reduced cost exceeds UB − LB cannot be in a placement better than UB, so it is fixed out; what is left
is a window of blocks per layer around the Lagrangian solution, and the MILP over the windows is exactly
the MILP over all blocks (tests check this against the unreduced model and against brute force).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hotcold.errors import InfeasibleError, InputError
from hotcold.solver.costmodel import ProfileCosts

US = 1e6  # the adaptive MILP works in microseconds (coefficients ~1, well inside solver tolerances)


# ---- blocks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """Block boundaries per layer: bounds[l, k] = hot neurons when the first k blocks are hot."""

    bounds: np.ndarray  # [L, M+1] int64, padded past m[l] with n_ff
    m: np.ndarray  # [L] number of blocks in layer l

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.bounds.shape[1])[None, :] <= self.m[:, None]


def make_blocks(n_layers: int, n_ff: int, group_size: int, min_hot: np.ndarray | None = None) -> Blocks:
    if group_size < 1:
        raise InputError(f"group size {group_size} must be at least 1", "pass --group-size 64 (or 1 for exact)")
    rows = []
    for l in range(n_layers):
        c = int(min_hot[l]) if min_hot is not None else 0
        first = min(n_ff, max(group_size, -(-c // group_size) * group_size))
        rows.append(np.concatenate([[0], np.arange(first, n_ff, group_size), [n_ff]]).astype(np.int64))
    m = np.array([len(r) - 1 for r in rows], dtype=np.int64)
    bounds = np.full((n_layers, int(m.max()) + 1), n_ff, dtype=np.int64)
    for l, r in enumerate(rows):
        bounds[l, : len(r)] = r
    return Blocks(bounds=bounds, m=m)


# ---- the problem in block form ----------------------------------------------------------------
@dataclass
class BlockProblem:
    """min Σ_l value[l, k_l] over block counts k_l, s.t. k_lo ≤ Σ_l bounds[l, k_l] ≤ k_hi."""

    kind: str  # "adaptive" | "impact"
    blocks: Blocks
    value: np.ndarray  # [L, M+1], +inf where invalid (minimised; impact: minus served frequency)
    k_lo: int
    k_hi: int
    gpu: np.ndarray | None = None  # adaptive: [L, M+1] µs of hot FFN on the GPU
    cpu: np.ndarray | None = None  # adaptive: [L, M+1] µs of cold FFN on the CPU
    sync: float = 0.0  # adaptive: µs per layer with a cold neuron (T_sync + T_host)
    pre: float = 0.0  # adaptive: µs per layer before the split
    overlap: bool = True
    served: np.ndarray | None = None  # impact: [L, M+1] Σ f of hot neurons


def adaptive_problem(pc: ProfileCosts, blocks: Blocks, k_lo: int, k_hi: int) -> BlockProblem:
    gpu = pc.gpu_at(blocks.bounds) * US
    cpu = pc.cpu_at(blocks.bounds) * US
    sync, pre = pc.cm.split_s * US, pc.cm.pre_s * US  # a layer with CPU work pays sync + host overhead
    ffn = np.maximum(gpu, cpu) if pc.cm.overlap else gpu + cpu
    value = pre + ffn + sync * (blocks.bounds < pc.n_ff)
    value = np.where(blocks.valid, value, np.inf)
    return BlockProblem("adaptive", blocks, value, k_lo, k_hi, gpu=gpu, cpu=cpu, sync=sync, pre=pre,
                        overlap=pc.cm.overlap)


def impact_problem(pc: ProfileCosts, blocks: Blocks, k_lo: int, k_hi: int) -> BlockProblem:
    served = np.take_along_axis(pc.cum_f, blocks.bounds, axis=1)
    value = np.where(blocks.valid, -served, np.inf)
    return BlockProblem("impact", blocks, value, k_lo, k_hi, served=served)


# ---- solution -----------------------------------------------------------------------------------
@dataclass
class BlockSolution:
    k: np.ndarray  # [L] blocks hot per layer
    n_hot: np.ndarray  # [L] hot neurons per layer
    objective: float  # in the problem's units (adaptive: µs per token without the head; impact: −Σ f)
    bound: float  # proven lower bound on the optimum (same units)
    status: str  # optimal | feasible (time limit, gap reported) | heuristic (MILP found nothing in time)
    backend: str
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-12))


# ---- Lagrangian bound, greedy feasible point, windows -----------------------------------------
def _choose(value: np.ndarray, N: np.ndarray, nu: float) -> tuple[np.ndarray, int, float]:
    w = value + nu * N
    k = np.argmin(w, axis=1)
    rows = np.arange(len(k))
    return k, int(N[rows, k].sum()), float(w[rows, k].sum())


def lagrangian(p: BlockProblem, iters: int = 64) -> tuple[float, float, list[np.ndarray]]:
    """Best multiplier ν on Σ hot ∈ [k_lo, k_hi]: returns (ν, lower bound, candidate choices)."""
    N = p.blocks.bounds.astype(np.float64)
    finite = p.value[np.isfinite(p.value)]
    span = float(finite.max() - finite.min()) + 1.0  # |ν| beyond this picks the fewest / most neurons

    def g(nu: float) -> tuple[float, np.ndarray, int]:
        k, n, w = _choose(p.value, N, nu)
        return w - nu * (p.k_hi if nu >= 0 else p.k_lo), k, n

    lb0, k0, n0 = g(0.0)
    if p.k_lo <= n0 <= p.k_hi:
        return 0.0, lb0, [k0]
    if n0 > p.k_hi:
        lo, hi = 0.0, span  # n(lo) > k_hi >= n(hi)
        inside = lambda n: n <= p.k_hi  # noqa: E731
    else:
        lo, hi = -span, 0.0  # n(lo) >= k_lo > n(hi)
        inside = lambda n: n < p.k_lo  # noqa: E731  (True on the hi side)
    best = (lb0, 0.0)
    cands = [k0]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lb, k, n = g(mid)
        best = max(best, (lb, mid))
        if inside(n):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-13 * span:
            break
    for nu in (lo, hi):
        lb, k, n = g(nu)
        best = max(best, (lb, nu))
        cands.append(k)
    return best[1], best[0], cands


def greedy(p: BlockProblem, k: np.ndarray, max_moves: int | None = None) -> np.ndarray | None:
    """Repair k to meet k_lo ≤ Σ hot ≤ k_hi, then apply the best single-layer move while it improves."""
    N = p.blocks.bounds
    rows = np.arange(len(k))
    k = k.copy()
    max_moves = max_moves or 8 * len(k) + 64
    for _ in range(max_moves):
        cur_n = N[rows, k]
        total = int(cur_n.sum())
        cur_v = p.value[rows, k]
        new_total = total - cur_n[:, None] + N
        ok = (new_total >= p.k_lo) & (new_total <= p.k_hi) & np.isfinite(p.value)
        dv = p.value - cur_v[:, None]
        if p.k_lo <= total <= p.k_hi:
            dv = np.where(ok, dv, np.inf)
            j = np.unravel_index(np.argmin(dv), dv.shape)
            if not dv[j] < -1e-12 * (1.0 + abs(float(cur_v.sum()))):
                return k
        else:  # infeasible: move toward the budget range, cheapest per neuron moved
            want_up = total < p.k_lo
            dn = (N - cur_n[:, None]) if want_up else (cur_n[:, None] - N)
            toward = (dn > 0) & np.isfinite(p.value) & ((new_total <= p.k_hi) if want_up else (new_total >= p.k_lo))
            if not toward.any():
                return None
            ratio = np.where(toward, dv / np.maximum(dn, 1), np.inf)
            j = np.unravel_index(np.argmin(ratio), ratio.shape)
        k[j[0]] = j[1]
    cur_n = N[rows, k]
    return k if p.k_lo <= cur_n.sum() <= p.k_hi else None


def windows(p: BlockProblem, nu: float, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the range [a, b] of block counts whose reduced cost is within `slack`."""
    w = p.value + nu * p.blocks.bounds
    red = w - w.min(axis=1, keepdims=True)
    keep = red <= slack
    a = keep.argmax(axis=1)
    b = keep.shape[1] - 1 - keep[:, ::-1].argmax(axis=1)
    return a.astype(np.int64), b.astype(np.int64)


# ---- exact dynamic programme over the windows ------------------------------------------------------
DP_MIN_FREE = 4096  # auto: below this many free blocks CBC closes the MILP quickly (bench/bench_solver.py)
DP_MAX_WORK = 1e9  # auto: the most state updates the programme may take (about 2 s of numpy on one core)


def _dp_plan(p: BlockProblem, a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """(unit, base, states, work): the total hot count is base + s·unit for s in [0, states)."""
    N = p.blocks.bounds
    L = len(a)
    sizes = [N[l, int(a[l]) + 1: int(b[l]) + 1] - N[l, int(a[l]): int(b[l])] for l in range(L)]
    unit = int(np.gcd.reduce(np.concatenate(sizes))) if any(len(x) for x in sizes) else 1
    base = int(N[np.arange(L), a].sum())
    reach = int(((N[np.arange(L), b] - N[np.arange(L), a]) // unit).sum())
    states = max(0, min(reach, (p.k_hi - base) // unit)) + 1
    work = int((b - a + 1).sum()) * states
    return unit, base, states, work


def solve_dp(p: BlockProblem, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Exactly min Σ_l value[l, k_l] over k_l ∈ [a_l, b_l] with k_lo ≤ Σ_l bounds[l, k_l] ≤ k_hi.

    The budgets couple the layers through one sum, so a dynamic programme over that sum (in units of
    the block sizes' gcd) is exact: after layer l, best[s] is the least cost of layers 0..l with
    base + s·unit hot neurons. Cost Σ_l (window_l) × states. None: no choice meets the budgets.
    """
    N = p.blocks.bounds
    unit, base, S, _ = _dp_plan(p, a, b)
    if base > p.k_hi:
        return None
    best = np.full(S, np.inf)
    best[0] = 0.0
    picks = []
    for l in range(len(a)):
        al, bl = int(a[l]), int(b[l])
        offs = (N[l, al: bl + 1] - N[l, al]) // unit
        nxt = np.full(S, np.inf)
        pick = np.zeros(S, dtype=np.int32)
        for j in range(bl - al + 1):
            d = int(offs[j])
            if d >= S:
                break
            cand = best[: S - d] + p.value[l, al + j]
            better = cand < nxt[d:]
            np.copyto(nxt[d:], cand, where=better)
            pick[d:][better] = j
        best = nxt
        picks.append((pick, offs))
    lo = max(0, -((base - p.k_lo) // unit))  # the fewest units that reach k_lo
    if lo >= S or not np.isfinite(best[lo:]).any():
        return None
    s = lo + int(np.argmin(best[lo:]))
    k = np.empty(len(a), dtype=np.int64)
    for l in range(len(a) - 1, -1, -1):
        pick, offs = picks[l]
        j = int(pick[s])
        k[l] = int(a[l]) + j
        s -= int(offs[j])
    return k


# ---- the MILP in PuLP -----------------------------------------------------------------------------
def _solver(name: str, time_limit: float, mip_gap: float):
    import pulp

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if name in ("auto", "highs"):
        highs = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=mip_gap, threads=threads)
        if highs.available():
            return highs, "highs"
        if name == "highs":
            raise InputError("the HiGHS solver is not installed", "pip install highspy, or use --solver cbc")
    if name not in ("auto", "cbc", "highs"):
        raise InputError(f"unknown MILP solver {name!r}", "use auto, cbc or highs")
    with warnings.catch_warnings():  # PuLP 3.x deprecates the bundled-CBC class name, not the solver
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1.0, time_limit), gapRel=mip_gap, threads=threads), "cbc"


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send file descriptor 1 to 2 while a native solver runs.

    highspy prints its banner ("Running HiGHS ...") from C++ to the process's stdout when a model is
    created, before PuLP can turn its output off; stdout carries hotcold's results (`--json`), so the
    banner goes to stderr with the other progress text. C's stdio buffers are flushed before fd 1 is
    restored, or the banner would still reach stdout at exit.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no fd 1 (embedded interpreter): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            import ctypes

            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def solve_blocks(p: BlockProblem, time_limit: float = 10.0, mip_gap: float = 1e-4, solver: str = "auto",
                 reduce: bool = True, formulation: str = "incremental",
                 log: Callable[[str], None] = lambda s: None) -> BlockSolution:
    """Solve a BlockProblem exactly (within mip_gap) with PuLP, after Lagrangian reduction.

    solver: "cbc" or "highs" — the MILP; "dp" — the exact dynamic programme (`solve_dp`); "auto" — the
    programme when at least DP_MIN_FREE blocks are left free and it fits DP_MAX_WORK state updates (there
    CBC can run to its time limit without closing the last 0.04%), else HiGHS if installed, else CBC.
    reduce=False skips the Lagrangian shortcuts (windows, the early exit, auto's programme): the MILP over
    every block.

    formulation (adaptive only): "epigraph" is the MILP as design.md writes it — z_l ≥ T_gpu,l(x),
    z_l ≥ T_cpu,l(x), sync (1 − x_{l,last}); "incremental" (default) gives each block binary the change
    in T_l it makes. Both are exact on prefix-ordered binaries and give the same optimum (tested); the
    incremental one's LP relaxation is tighter (each layer's convex hull), so CBC proves it faster.
    """
    import pulp

    if formulation not in ("incremental", "epigraph"):
        raise InputError(f"unknown MILP formulation {formulation!r}", "use incremental or epigraph")
    if solver not in ("auto", "cbc", "highs", "dp"):
        raise InputError(f"unknown MILP solver {solver!r}", "use auto, cbc, highs or dp")

    t0 = time.perf_counter()
    L = p.value.shape[0]
    N = p.blocks.bounds
    rows = np.arange(L)
    nu, lb, cands = lagrangian(p)
    ub_k = None
    # start from the choices already inside the budgets (the multiplier's feasible side), else repair
    inside = [k for k in cands if p.k_lo <= N[rows, k].sum() <= p.k_hi]
    for k in inside or cands:
        g = greedy(p, k)
        if g is not None and (ub_k is None or p.value[rows, g].sum() < p.value[rows, ub_k].sum()):
            ub_k = g
    ub = float(p.value[rows, ub_k].sum()) if ub_k is not None else np.inf
    scale = max(1.0, abs(ub) if np.isfinite(ub) else abs(lb))
    # the greedy placement is already within mip_gap of the Lagrangian bound: nothing left for a MILP
    # (reduce=False: the MILP over every block, no shortcut — the reference the reduction is tested against)
    proven = reduce and ub_k is not None and ub - lb <= mip_gap * max(abs(ub), 1e-12)
    if proven:
        a, b = ub_k.copy(), ub_k.copy()
    elif reduce and ub_k is not None:
        a, b = windows(p, nu, (ub - lb) + 1e-9 * scale)
        a, b = np.minimum(a, ub_k), np.maximum(b, ub_k)  # the incumbent is inside (theory; guards rounding)
    else:
        a, b = np.zeros(L, dtype=np.int64), p.blocks.m.copy()
    n_full = int(p.blocks.m.sum())
    n_vars = int((b - a).sum())
    log(f"{p.kind}: Lagrangian bound {lb:.6g}, greedy {ub:.6g}; {n_vars} of {n_full} blocks left free"
        + (" (greedy within the MIP gap: no MILP)" if proven else ""))
    sign = 1.0 if p.kind == "adaptive" else -1.0
    dp_work = _dp_plan(p, a, b)[3] if n_vars else 0
    auto_dp = solver == "auto" and reduce and n_vars >= DP_MIN_FREE and dp_work <= DP_MAX_WORK
    if n_vars and (solver == "dp" or auto_dp):
        k = solve_dp(p, a, b)
        if k is None and ub_k is None:
            raise InfeasibleError(
                f"no {p.kind} placement meets both budgets at this group size: between {p.k_lo} and {p.k_hi} "
                "hot neurons are needed, in whole groups per layer (and C_l where enforced)",
                "raise --gpu-budget or --cpu-budget, or pass --group-size 1 (or --no-min-hot)")
        if k is None:
            raise RuntimeError("the dynamic programme lost the greedy placement")
        obj = float(p.value[rows, k].sum())
        if not p.k_lo <= N[rows, k].sum() <= p.k_hi or (ub_k is not None and obj > ub + 1e-9 * scale):
            raise RuntimeError("the dynamic programme returned a placement outside the budgets or worse than greedy")
        seconds = time.perf_counter() - t0
        log(f"{p.kind}: dynamic programme over {n_vars} free blocks, {dp_work:.3g} state updates, {seconds:.2f} s")
        return BlockSolution(
            k=k, n_hot=N[rows, k], objective=obj, bound=obj, status="optimal", backend="dp", seconds=seconds,
            stats={"blocks": n_full, "free_blocks": n_vars, "int_vars": 0, "constraints": 0,
                   "build_seconds": seconds, "lagrangian_bound": sign * lb,
                   "greedy_objective": sign * ub if np.isfinite(ub) else None, "multiplier": nu,
                   "pulp_status": None, "proven_by_lagrangian": False, "dp_state_updates": dp_work,
                   "formulation": "dynamic programme"})
    if solver == "dp":
        solver = "auto"  # nothing left free (the Lagrangian proved it): no programme to run

    if p.kind == "adaptive" and formulation == "epigraph":
        prob, extract, warm, n_int, n_cons = _model_epigraph(p, a, b)
    else:
        prob, extract, warm, n_int, n_cons = _model_runs(p, a, b)
    if ub_k is not None:  # warm start from the greedy placement
        warm(ub_k)
    t_build = time.perf_counter() - t0
    remaining = max(1.0, time_limit - t_build)
    backend_solver, backend = _solver(solver, remaining, mip_gap)
    if n_vars:
        try:
            if backend == "cbc" and ub_k is not None:
                backend_solver.optionsDict["warmStart"] = True
            with _stdout_to_stderr() if backend == "highs" else contextlib.nullcontext():
                prob.solve(backend_solver)
        except pulp.PulpSolverError as e:
            raise InfeasibleError(f"the MILP solver failed ({e})", "re-run with --solver cbc, or --debug") from None
        status, sol = pulp.LpStatus[prob.status], prob.sol_status
    else:
        status, sol = "Optimal", pulp.LpSolutionOptimal
    seconds = time.perf_counter() - t0

    if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        k = extract() if n_vars else a.copy()
        n_hot = N[rows, k]
        if not p.k_lo <= n_hot.sum() <= p.k_hi:
            raise RuntimeError("solver returned a placement outside the budgets")
        obj = float(p.value[rows, k].sum())
        if ub_k is not None and ub < obj:  # keep the better of solver and incumbent
            k, obj = ub_k, ub
        solver_status = "optimal" if sol == pulp.LpSolutionOptimal else "feasible"
        if proven:  # optimal within mip_gap, as a MILP solver reports it
            bound = min(lb, obj)
        elif not n_vars:  # the windows left one placement: the Lagrangian bound proves it optimal
            bound = obj
        else:
            bound = max(lb, obj - mip_gap * abs(obj)) if solver_status == "optimal" else lb
        bound = min(bound, obj)
    elif prob.status == pulp.LpStatusInfeasible and ub_k is None:
        raise InfeasibleError(
            f"no {p.kind} placement meets both budgets at this group size: between {p.k_lo} and {p.k_hi} "
            "hot neurons are needed, in whole groups per layer (and C_l where enforced)",
            "raise --gpu-budget or --cpu-budget, or pass --group-size 1 (or --no-min-hot)")
    elif ub_k is not None:  # time limit before the MILP found anything: the greedy placement, with its gap
        k, obj, solver_status, bound = ub_k, ub, "heuristic", lb
    else:
        raise InfeasibleError(f"the {backend} solver found no {p.kind} placement within {time_limit:g} s "
                              f"(status {status})", "raise --time-limit, or pass a larger --group-size")
    return BlockSolution(
        k=k, n_hot=N[rows, k], objective=obj, bound=bound, status=solver_status, backend=backend, seconds=seconds,
        stats={"blocks": n_full, "free_blocks": n_vars, "int_vars": n_int, "constraints": n_cons,
               "build_seconds": t_build,
               "lagrangian_bound": sign * lb, "greedy_objective": sign * ub if np.isfinite(ub) else None,
               "multiplier": nu, "pulp_status": status, "proven_by_lagrangian": bool(proven),
               "formulation": formulation if p.kind == "adaptive" else "linear"})


def _budget_rows(pulp, prob, p: BlockProblem, terms: list[tuple[Any, int]], fixed_n: int) -> int:
    """GPU / CPU budget rows over (variable, neurons) terms. Block sizes share a divisor (the group size,
    unless a layer ends in a partial group): dividing by it and rounding the right-hand sides inward is
    exact for integer variables and closes the LP gap that an unreachable fractional capacity would leave
    (which CBC cannot close quickly)."""
    div = int(np.gcd.reduce([n for _, n in terms])) if terms else 1
    mem = pulp.LpAffineExpression([(v, float(n // div)) for v, n in terms])
    n = 0
    L = p.blocks.bounds.shape[0]
    if p.k_hi < L * int(p.blocks.bounds[:, -1].max()):
        prob += mem <= (p.k_hi - fixed_n) // div, "gpu_budget"
        n += 1
    if p.k_lo > 0:
        prob += mem >= -((fixed_n - p.k_lo) // div), "cpu_budget"
        n += 1
    return n


def _model_runs(p: BlockProblem, a: np.ndarray, b: np.ndarray):
    """Incremental MILP (adaptive's default, and impact) over the windows, blocks merged into runs.

    Block j of layer l costs value[l, j+1] − value[l, j] (impact: minus the frequency it serves). A run
    of consecutive blocks with the same size and increment (ties in f; the GPU-bound stretch of a layer,
    where every block adds the same GPU time) becomes one integer count y ∈ [0, run length]: only the
    count matters inside a run, and the symmetric binaries that CBC would branch over disappear. Prefix
    order across runs: a run may be used only once the run before it is full (a binary per long run).
    """
    import pulp

    prob = pulp.LpProblem(f"hotcold_{p.kind}", pulp.LpMinimize)
    new_var = getattr(prob, "add_variable", None) or pulp.LpVariable  # PuLP >= 3.3 attaches variables to the model
    N = p.blocks.bounds
    L = N.shape[0]
    runs: list[list[tuple[int, int, int, Any, Any]]] = []  # per layer: (start, length, size, y, full flag)
    mem_terms, obj_terms = [], []
    const = float(p.value[np.arange(L), a].sum())
    n_int = n_cons = 0
    for l in range(L):
        al, bl = int(a[l]), int(b[l])
        d = np.diff(p.value[l, al: bl + 1])
        sz = np.diff(N[l, al: bl + 1])
        rl: list[tuple[int, int, int, Any, Any]] = []
        j = 0
        while j < bl - al:
            e = j + 1
            tol = 1e-12 * max(1.0, abs(float(d[j])))
            while e < bl - al and sz[e] == sz[j] and abs(float(d[e] - d[j])) <= tol:
                e += 1
            length = e - j
            y = new_var(f"y_{l}_{al + j}", lowBound=0, upBound=length, cat="Binary" if length == 1 else "Integer")
            n_int += 1
            obj_terms.append((y, float(d[j:e].sum()) / length))
            mem_terms.append((y, int(sz[j])))
            rl.append((al + j, length, int(sz[j]), y, None))
            j = e
        for r in range(len(rl) - 1):  # run r+1 only once run r is full
            start, length, size, y, _ = rl[r]
            y_next, len_next = rl[r + 1][3], rl[r + 1][1]
            if length == 1:
                prob += y_next <= len_next * y, f"prefix_{l}_{r}"
                n_cons += 1
            else:
                full = new_var(f"full_{l}_{start}", lowBound=0, upBound=1, cat="Binary")
                n_int += 1
                prob += y >= length * full, f"full_{l}_{r}"
                prob += y_next <= len_next * full, f"prefix_{l}_{r}"
                rl[r] = (start, length, size, y, full)
                n_cons += 2
        runs.append(rl)
    n_cons += _budget_rows(pulp, prob, p, mem_terms, int(N[np.arange(L), a].sum()))
    prob += pulp.LpAffineExpression(obj_terms, constant=const)

    def extract() -> np.ndarray:
        k = a.copy()
        for l, rl in enumerate(runs):
            counts = [int(round(r[3].value() or 0.0)) for r in rl]
            for r in range(len(rl) - 1):
                if counts[r + 1] and counts[r] != rl[r][1]:
                    raise RuntimeError(f"solver returned a non-prefix block set in layer {l}")
            k[l] += sum(counts)
        return k

    def warm(ub_k: np.ndarray) -> None:
        for l, rl in enumerate(runs):
            for start, length, _, y, full in rl:
                c = int(min(length, max(0, ub_k[l] - start)))
                y.setInitialValue(c)
                if full is not None:
                    full.setInitialValue(1 if c == length else 0)

    return prob, extract, warm, n_int, n_cons


def _model_epigraph(p: BlockProblem, a: np.ndarray, b: np.ndarray):
    """Adaptive MILP as design.md writes it: a binary per block, prefix rows, z_l ≥ T_gpu, z_l ≥ T_cpu."""
    import pulp

    prob = pulp.LpProblem("hotcold_adaptive", pulp.LpMinimize)
    new_var = getattr(prob, "add_variable", None) or pulp.LpVariable
    N = p.blocks.bounds
    L = N.shape[0]
    x = [[new_var(f"x_{l}_{j}", lowBound=0, upBound=1, cat="Binary") for j in range(a[l], b[l])] for l in range(L)]
    n_cons = _budget_rows(pulp, prob, p, [(x[l][j - a[l]], int(N[l, j + 1] - N[l, j]))
                                          for l in range(L) for j in range(a[l], b[l])], int(N[np.arange(L), a].sum()))
    obj_terms: list[tuple[Any, float]] = []
    const = 0.0
    for l in range(L):
        xs, al, bl, ml = x[l], int(a[l]), int(b[l]), int(p.blocks.m[l])
        for j in range(len(xs) - 1):
            prob += xs[j + 1] <= xs[j], f"prefix_{l}_{j}"
            n_cons += 1
        gpu, cpu = p.gpu[l], p.cpu[l]
        if al < ml:  # sync: paid unless the layer is all hot (its last block is hot)
            const += p.sync
            if bl == ml:
                obj_terms.append((xs[-1], -p.sync))
        const += p.pre
        if not xs:
            const += float(max(gpu[al], cpu[al]) if p.overlap else gpu[al] + cpu[al])
            continue
        zmax = float(max(gpu[bl], cpu[al]) if p.overlap else gpu[bl] + cpu[al])
        z = new_var(f"z_{l}", lowBound=0, upBound=zmax * (1 + 1e-9) + 1e-9)
        obj_terms.append((z, 1.0))
        g_expr = pulp.LpAffineExpression([(xs[j - al], float(gpu[j + 1] - gpu[j])) for j in range(al, bl)])
        c_expr = pulp.LpAffineExpression([(xs[j - al], float(cpu[j] - cpu[j + 1])) for j in range(al, bl)])
        if p.overlap:
            prob += z - g_expr >= float(gpu[al]), f"z_gpu_{l}"
            prob += z + c_expr >= float(cpu[al]), f"z_cpu_{l}"
            n_cons += 2
        else:
            prob += z - g_expr + c_expr >= float(gpu[al] + cpu[al]), f"z_bus_{l}"
            n_cons += 1
    prob += pulp.LpAffineExpression(obj_terms, constant=const)

    def extract() -> np.ndarray:
        k = a.copy()
        for l in range(L):
            vals = [round(v.value() or 0.0) for v in x[l]]
            if any(vals[j + 1] > vals[j] for j in range(len(vals) - 1)):
                raise RuntimeError(f"solver returned a non-prefix block set in layer {l}")
            k[l] += sum(vals)
        return k

    def warm(ub_k: np.ndarray) -> None:
        for l in range(L):
            for j, v in enumerate(x[l]):
                v.setInitialValue(1 if a[l] + j < ub_k[l] else 0)

    return prob, extract, warm, len([v for xs in x for v in xs]), n_cons


# ---- fixed -------------------------------------------------------------------------------------
def fixed_tau_counts(f: np.ndarray, tau: float) -> np.ndarray:
    """Hot iff f_i ≥ τ: hot neurons per layer."""
    return (np.asarray(f) >= tau).sum(axis=1).astype(np.int64)


def fixed_budget_tau(f: np.ndarray, k_hi: int) -> tuple[float | None, int]:
    """The smallest global τ with #{f_i ≥ τ} ≤ k_hi; returns (τ, count). τ None: no neuron fits."""
    flat = np.sort(np.asarray(f, dtype=np.float64).ravel())[::-1]
    if k_hi >= flat.size:
        return float(flat[-1]), int(flat.size)
    v = flat[k_hi]  # the first neuron that does not fit; every neuron as frequent as it stays cold too
    c = int(np.searchsorted(-flat, -v, side="left"))
    return (float(flat[c - 1]) if c else None), c


def frequency_order(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's indices sorted by f descending, ties by index ascending ([L, n] int32), and f in that order.

    Fast path: one unstable sort of a unique integer key (float32 bits of f, then the index), checked
    against f in float64; a stable sort when the check fails (values closer than float32 resolves).
    """
    f = np.asarray(f, dtype=np.float64)
    L, n = f.shape
    bits = max(1, int(n - 1).bit_length())
    if n and f.min() >= 0 and f.max() <= 1 and bits <= 32:
        f32 = f.astype(np.float32).view(np.int32).astype(np.int64)  # monotone in f for f >= 0
        key = ((np.int64(0x3F800000) - f32) << bits) | np.arange(n, dtype=np.int64)[None, :]
        order = np.argsort(key, axis=1)
        fs = np.take_along_axis(f, order, axis=1)
        d = np.diff(fs, axis=1)
        if (d <= 0).all() and (np.diff(order, axis=1)[d == 0] > 0).all():
            return order.astype(np.int32), fs
    order = np.argsort(-f, axis=1, kind="stable")
    return order.astype(np.int32), np.take_along_axis(f, order, axis=1)
