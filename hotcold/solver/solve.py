"""`solve()`: a Profile + a HardwareSpec + budgets -> a Placement (design.md §4). The library entry point."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hotcold.errors import InfeasibleError, InputError
from hotcold.memory import (
    COLD_MODES, MemoryAccount, canonical_dtype, format_bytes, neuron_bytes, parse_bytes, placement_bytes,
)
from hotcold.model.config import ModelConfig
from hotcold.solver.costmodel import CostModel, ProfileCosts
from hotcold.solver.hardware import HardwareSpec, resolve
from hotcold.solver.placement import Placement
from hotcold.solver.policies import (
    adaptive_problem, fixed_budget_tau, frequency_order, fixed_tau_counts, impact_problem, make_blocks, solve_blocks,
)

POLICIES = ("fixed", "impact", "adaptive")
# fractions of a layer's neurons (hottest first) at which the manifest records the layer's frequency,
# so reports can draw each layer's frequency curve without the profile
RANK_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def solve(profile, hardware: HardwareSpec | str | Path, policy: str = "adaptive", gpu_budget: int | str | None = None,
          cpu_budget: int | str | None = None, tau: float | None = None, group_size: int = 64,
          cold_mode: str = "threshold", ctx_len: int | None = None, time_limit: float = 10.0, *,
          dtype: str | None = None, min_hot: bool | None = None, mip_gap: float = 1e-4, solver: str = "auto",
          phase: str = "decode", predictor_rank: int | None = None, gpu_sparse: bool = False, reduce: bool = True,
          formulation: str = "incremental", log: Callable[[str], None] = lambda s: None) -> Placement:
    """Place `profile`'s neurons on `hardware` under the budgets with `policy`; nothing is written.

    hardware: a HardwareSpec, a preset name (pc-high, pc-low, h200) or a spec file from `hotcold calibrate`.
    gpu_budget / cpu_budget: bytes or strings with units ('48GiB'); default: the device's memory less its
    reserve. tau: `fixed` only — hot iff f ≥ tau in every layer (else the global tau filling the budget).
    min_hot: enforce C_l (default: on for impact and adaptive, off for fixed, as PowerInfer ships it).
    ctx_len: context the KV cache is sized for and latency is modelled at (default: the model's maximum).
    reduce / formulation: see policies.solve_blocks (the defaults are exact and fast).
    Save the result with `placement.save(dir)`.
    """
    if isinstance(hardware, (str, Path)):
        p = Path(hardware)
        hardware = resolve(path=p) if p.suffix == ".json" or p.exists() else resolve(preset_name=str(hardware))
    cfg = profile.model_config
    f = profile.frequencies(phase)
    profile_ref = {"content_hash": profile.content_hash, "path": str(profile.path) if profile.path else None,
                   "phase": phase, "token_count": profile.token_count,
                   "dataset": profile.manifest.get("dataset"), "activation": profile.manifest.get("activation")}
    return solve_frequencies(f, cfg, hardware, policy=policy, gpu_budget=gpu_budget, cpu_budget=cpu_budget, tau=tau,
                             group_size=group_size, cold_mode=cold_mode, ctx_len=ctx_len, time_limit=time_limit,
                             dtype=dtype, min_hot=min_hot, mip_gap=mip_gap, solver=solver,
                             predictor_rank=predictor_rank, gpu_sparse=gpu_sparse, reduce=reduce,
                             formulation=formulation, log=log,
                             fingerprint=profile.fingerprint, profile_ref=profile_ref)


def solve_frequencies(f: np.ndarray, cfg: ModelConfig, hw: HardwareSpec, policy: str = "adaptive",
                      gpu_budget: int | str | None = None, cpu_budget: int | str | None = None,
                      tau: float | None = None, group_size: int = 64, cold_mode: str = "threshold",
                      ctx_len: int | None = None, time_limit: float = 10.0, *, dtype: str | None = None,
                      min_hot: bool | None = None, mip_gap: float = 1e-4, solver: str = "auto",
                      predictor_rank: int | None = None, gpu_sparse: bool = False, reduce: bool = True,
                      formulation: str = "incremental",
                      log: Callable[[str], None] = lambda s: None, fingerprint: str = "unknown",
                      profile_ref: dict[str, Any] | None = None) -> Placement:
    """`solve` on a [n_layers, n_ff] frequency array instead of a Profile (tests, benchmarks, runtime)."""
    t0 = time.perf_counter()
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}", f"use one of: {', '.join(POLICIES)}")
    if cold_mode not in COLD_MODES:
        raise InputError(f"unknown cold-neuron mode {cold_mode!r}", f"use one of: {', '.join(COLD_MODES)}")
    if tau is not None and policy != "fixed":
        raise InputError(f"--tau applies to the fixed policy, not {policy}", "drop --tau, or pass --policy fixed")
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise InputError(f"tau {tau} is not a frequency in [0, 1]", "pass e.g. --tau 0.05")
    if not time_limit > 0:
        raise InputError(f"time limit {time_limit} must be positive", "pass --time-limit 60")
    if not 0 <= mip_gap < 1:
        raise InputError(f"MIP gap {mip_gap} is not a fraction in [0, 1)", "pass e.g. --mip-gap 1e-3 (0.1%)")
    f = np.asarray(f, dtype=np.float64)
    if f.shape != (cfg.n_layers, cfg.n_ff):
        raise InputError(f"frequencies have shape {f.shape}, the model {cfg.n_layers}x{cfg.n_ff}",
                         "use a profile of this model")
    dtype = canonical_dtype(dtype or hw.dtype)
    ctx_len = int(ctx_len or cfg.max_seq_len)
    gpu_b = parse_bytes(gpu_budget, "GPU budget") if gpu_budget is not None else hw.default_gpu_budget
    cpu_b = parse_bytes(cpu_budget, "CPU budget") if cpu_budget is not None else hw.default_cpu_budget
    cm = CostModel(cfg, hw, dtype, cold_mode=cold_mode, ctx_len=ctx_len, predictor_rank=predictor_rank or 0,
                   gpu_sparse=gpu_sparse)
    acct0 = _account(cfg, np.zeros(cfg.n_layers, dtype=np.int64), cm)
    k_lo, k_hi = _neuron_bounds(cfg, cm, acct0, gpu_b, cpu_b)
    enforce = (policy != "fixed") if min_hot is None else bool(min_hot)

    order, f_sorted = frequency_order(f)
    pc = ProfileCosts(cm, f_sorted)
    c_l = pc.min_hot()
    nb = cm.neuron.total
    params: dict[str, Any] = {"tau": tau, "group_size": group_size, "min_hot": enforce, "mip_gap": mip_gap,
                              "time_limit": time_limit, "solver": solver, "reduce": reduce,
                              "formulation": formulation if policy == "adaptive" else None}

    if policy == "fixed":
        if tau is not None:
            n_hot = fixed_tau_counts(f, tau)
            _check_fixed_tau(f, tau, n_hot, k_lo, k_hi, nb, acct0, gpu_b, cpu_b)
            status, global_tau = "given", tau
        else:
            global_tau, count = fixed_budget_tau(f, k_hi)
            if count < k_lo:
                raise InfeasibleError(
                    f"no single frequency threshold fits both budgets: the CPU budget needs at least {k_lo} hot "
                    f"neurons, and neurons as frequent as the coldest one that fits the GPU only add up to {count}",
                    "raise --cpu-budget, or use --policy adaptive/impact (they split ties)")
            n_hot = (f >= global_tau).sum(axis=1) if global_tau is not None else np.zeros(cfg.n_layers, np.int64)
            status = "optimal"
        served = float(np.take_along_axis(pc.cum_f, n_hot[:, None], axis=1).sum())
        if enforce:
            bad = [l for l in range(cfg.n_layers) if 0 < n_hot[l] < c_l[l]]
            if bad:
                raise InfeasibleError(f"the fixed threshold leaves layers {bad[:8]} with fewer hot neurons than C_l",
                                      "drop --min-hot for the fixed policy, or use --policy impact/adaptive")
        solver_info = {"status": status, "objective": served, "objective_name": "served activation frequency (Σ f)",
                       "bound": served, "gap": 0.0, "backend": "closed form", "global_tau": global_tau}
    else:
        blocks = make_blocks(cfg.n_layers, cfg.n_ff, group_size, c_l if enforce else None)
        build = adaptive_problem if policy == "adaptive" else impact_problem
        sol = solve_blocks(build(pc, blocks, k_lo, k_hi), time_limit=time_limit, mip_gap=mip_gap, solver=solver,
                           reduce=reduce, formulation=formulation, log=log)
        n_hot = sol.n_hot
        sign = 1.0 if policy == "adaptive" else -1.0
        solver_info = {"status": sol.status, "objective": sign * sol.objective, "bound": sign * sol.bound,
                       "objective_name": "modelled latency, layers only (µs per token)" if policy == "adaptive"
                       else "served activation frequency (Σ f)",
                       "gap": sol.gap, "backend": sol.backend, **sol.stats}
    n_hot = np.asarray(n_hot, dtype=np.int64)
    seconds = time.perf_counter() - t0
    solver_info["seconds"] = seconds
    log(f"{policy}: {solver_info['status']} in {seconds:.2f} s")
    manifest = _manifest(cfg, hw, cm, pc, n_hot, c_l, enforce, policy, params, solver_info, gpu_b, cpu_b,
                         fingerprint, profile_ref or {})
    return Placement(manifest=manifest, order=order, n_hot=n_hot.astype(np.int32))


# ---- budgets ----------------------------------------------------------------------------------
def _account(cfg: ModelConfig, n_hot: np.ndarray, cm: CostModel) -> MemoryAccount:
    return placement_bytes(cfg, n_hot, cm.dtype, ctx_len=cm.ctx_len, cold_mode=cm.cold_mode,
                           predictor_rank=cm.predictor_rank or None)


def _neuron_bounds(cfg: ModelConfig, cm: CostModel, acct0: MemoryAccount, gpu_b: int, cpu_b: int) -> tuple[int, int]:
    """Budgets -> [k_lo, k_hi] hot neurons in total, after the dense tensors; explains what does not fit."""
    g = acct0.gpu
    if acct0.gpu_fixed > gpu_b:
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in g.items() if v and k != "ffn_hot")
        raise InfeasibleError(
            f"attention, norms and embeddings alone need {format_bytes(acct0.gpu_fixed)} of GPU ({parts}); "
            f"the GPU budget is {format_bytes(gpu_b)}",
            f"raise --gpu-budget to at least {format_bytes(acct0.gpu_fixed)}, or shorten --ctx-len "
            f"(now {cm.ctx_len}), or use a smaller --dtype (now {cm.dtype})")
    if acct0.cpu_fixed > cpu_b:
        raise InfeasibleError(f"CPU buffers alone need {format_bytes(acct0.cpu_fixed)}; the CPU budget is "
                              f"{format_bytes(cpu_b)}", f"raise --cpu-budget to at least {format_bytes(acct0.cpu_fixed)}")
    nb = neuron_bytes(cfg, cm.dtype).total
    total = cfg.n_layers * cfg.n_ff
    k_hi = int(min(total, (gpu_b - acct0.gpu_fixed) // nb))
    k_lo = int(max(0, total - (cpu_b - acct0.cpu_fixed) // nb))
    if k_lo > k_hi:
        need = acct0.gpu_fixed + k_lo * nb
        raise InfeasibleError(
            f"the model does not fit: its FFN needs {format_bytes(total * nb)}, the CPU budget holds "
            f"{format_bytes(max(0, total - k_lo) * nb)} of it and the GPU budget {format_bytes(k_hi * nb)} "
            f"(after {format_bytes(acct0.gpu_fixed)} of dense tensors)",
            f"raise --gpu-budget to at least {format_bytes(need)} or --cpu-budget by {format_bytes((k_lo - k_hi) * nb)}")
    return k_lo, k_hi


def _check_fixed_tau(f, tau, n_hot, k_lo, k_hi, nb, acct0, gpu_b, cpu_b) -> None:
    hot = int(n_hot.sum())
    if hot > k_hi:
        fit_tau, _ = fixed_budget_tau(f, k_hi)
        need = acct0.gpu_fixed + hot * nb
        raise InfeasibleError(
            f"fixed τ={tau:g} makes {hot} neurons hot: {format_bytes(need)} of GPU ({format_bytes(acct0.gpu_fixed)} "
            f"dense + {format_bytes(hot * nb)} hot FFN rows), over the {format_bytes(gpu_b)} budget",
            f"raise --gpu-budget to at least {format_bytes(need)}"
            + (f", or raise --tau to at least {fit_tau:.4g} (the smallest τ that fits)" if fit_tau is not None else "")
            + ", or drop --tau to fill the budget")
    if hot < k_lo:
        cold = f.size - hot
        raise InfeasibleError(
            f"fixed τ={tau:g} leaves {cold} neurons cold: {format_bytes(acct0.cpu_fixed + cold * nb)} of CPU, "
            f"over the {format_bytes(cpu_b)} budget",
            f"raise --cpu-budget to at least {format_bytes(acct0.cpu_fixed + cold * nb)}, or lower --tau")


# ---- the manifest -----------------------------------------------------------------------------
def _regimes(pc: ProfileCosts, n_hot: np.ndarray, group_size: int) -> list[str]:
    t = pc.times(n_hot)
    one = np.ones((pc.n_layers, 1), dtype=np.int64)
    step = max(group_size, 1) * float(max(pc.gpu_cum(one).max(), pc.cpu_cum(one).max()))
    out = []
    for l, k in enumerate(n_hot):
        if k == pc.n_ff:
            out.append("all-hot")
        elif k == 0:
            out.append("all-cold")
        elif not pc.cm.overlap:
            out.append("shared-bus")
        elif abs(t.gpu[l] - t.cpu[l]) <= step:
            out.append("balanced")
        else:
            out.append("gpu-bound" if t.gpu[l] > t.cpu[l] else "cpu-bound")
    return out


def _manifest(cfg, hw, cm, pc, n_hot, c_l, enforce, policy, params, solver_info, gpu_b, cpu_b, fingerprint,
              profile_ref) -> dict[str, Any]:
    acct = _account(cfg, n_hot, cm)
    t = pc.times(n_hot)
    share = pc.gpu_share(n_hot)
    regimes = _regimes(pc, n_hot, params["group_size"] if policy != "fixed" else 1)
    layers = []
    for l in range(cfg.n_layers):
        k = int(n_hot[l])
        layers.append({
            "layer": l, "n_hot": k, "hot_fraction": k / cfg.n_ff,
            "tau": float(pc.f[l, k - 1]) if k else None,
            "min_hot": int(c_l[l]), "min_hot_ok": not (0 < k < c_l[l]),
            "gpu_bytes": acct.ffn_gpu_per_layer[l], "cpu_bytes": acct.ffn_cpu_per_layer[l],
            "gpu_share": float(share[l]), "mean_frequency": float(pc.cum_f[l, -1] / cfg.n_ff),
            "time_ms": {"pre": float(t.pre[l] * 1e3), "gpu": float(t.gpu[l] * 1e3), "cpu": float(t.cpu[l] * 1e3),
                        "sync": float(t.sync[l] * 1e3), "host": float(t.host[l] * 1e3),
                        "total": float(t.total[l] * 1e3)},
            "regime": regimes[l],
            "f_at_rank": [float(pc.f[l, min(cfg.n_ff - 1, int(q * cfg.n_ff))]) for q in RANK_GRID],
        })
    served = float(np.take_along_axis(pc.cum_f, n_hot[:, None], axis=1).sum())
    total_f = float(pc.cum_f[:, -1].sum())
    totals = {"gpu_bytes": acct.gpu_total, "cpu_bytes": acct.cpu_total, "n_hot": int(n_hot.sum()),
              "hot_fraction": float(n_hot.sum() / (cfg.n_layers * cfg.n_ff)),
              "gpu_share": served / total_f if total_f > 0 else 1.0,
              "modelled_ms_per_token": t.per_token * 1e3,
              "time_ms": {"pre": float(t.pre.sum() * 1e3), "gpu": float(t.gpu.sum() * 1e3),
                          "cpu": float(t.cpu.sum() * 1e3), "sync": float(t.sync.sum() * 1e3),
                          "host": float(t.host.sum() * 1e3), "head": t.head * 1e3},
              "split_layers": int((n_hot < cfg.n_ff).sum()),
              "min_hot_violations": int(sum(not x["min_hot_ok"] for x in layers))}
    return {
        "policy": {"name": policy, "parameters": params},
        "solver": solver_info,
        "model": {"fingerprint": fingerprint, "config": cfg.to_json()},
        "profile": profile_ref,
        "hardware": hw.to_json(),
        "budgets": {"gpu_bytes": int(gpu_b), "cpu_bytes": int(cpu_b)},
        "cold_mode": cm.cold_mode, "dtype": cm.dtype, "ctx_len": cm.ctx_len,
        "cost_model": cm.to_json(),
        "memory": acct.to_json(),
        "rank_grid": list(RANK_GRID),
        "layers": layers,
        "totals": totals,
    }
