"""The benchmark's hotcold runs and the helpers every run uses: timing one model's decode, the
hotcold-<policy> run (predictor mode, optionally with online migration), the threshold run with its
online t_l, and the timing and memory helpers.
"""

from __future__ import annotations

import gc
import os
import resource
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from hotcold.bench.fits import predict_ms
from hotcold.devices import median_time, synchronize
from hotcold.bench.weights import build_model
from hotcold.memory import neuron_bytes
from hotcold.model.random import F_CAP, GATE_T

if TYPE_CHECKING:
    from hotcold.bench.harness import BenchContext


# ---- timing ------------------------------------------------------------------------------------
def _sync(dev) -> None:
    synchronize(dev)


def _median_time(fn: Callable[[], Any], reps: int, dev, warm: int = 2) -> float:
    """Median seconds of `reps` calls of fn after `warm` untimed ones, the device synchronised around each."""
    return median_time(fn, reps, dev, warm)


# ---- memory ------------------------------------------------------------------------------------
def rss_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gpu_memory_start(dev) -> int:
    """Free what earlier runs left, reset the peak counter; the bytes still allocated (0 on the CPU)."""
    free_cuda()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


# ---- one model's decode ------------------------------------------------------------------------
def run_engine(eng, tokens: int, warm: int, start_token: int = 1, gpu_probe: int = 4) -> dict[str, Any]:
    """Decode `warm` + `tokens` steps (argmax fed back on the device); stats of the timed ones.

    If the Triton kernels fail to build or capture here, the engine falls back to its torch path (recorded)."""
    fallback = None
    try:
        eng.capture()
    except Exception as ex:  # noqa: BLE001 - recorded in the result, the run goes on with torch kernels
        if eng.ops is None:
            raise
        fallback = f"triton kernels failed, torch path used: {ex!r}"[:400]
        if eng.cuda:
            torch.cuda.synchronize(eng.device)
        eng.ops = None
        eng._graphs = None
        eng.capture()
    eng.reset()
    eng.step(start_token)
    for _ in range(warm - 1):
        eng.step(None)
    eng.totals = type(eng.totals)()
    for _ in range(tokens):
        eng.step(None)
    tt = eng.totals
    per = sorted(tt.per_token_s)
    res = {"tokens": tokens, "ms_per_token": 1e3 * tt.seconds / tokens,
           "ms_per_token_median": 1e3 * per[len(per) // 2], "tokens_per_s": tokens / tt.seconds,
           "cpu_kernel_ms_per_token": 1e3 * tt.cpu_kernel_s / tokens,
           "cpu_wait_ms_per_token": 1e3 * tt.cpu_wait_s / tokens,
           "cpu_GBps": (tt.cpu_bytes / tt.cpu_kernel_s / 1e9) if tt.cpu_kernel_s else None,
           "cpu_MB_per_token": tt.cpu_bytes / tokens / 1e6,
           "cold_active_per_token": tt.cold_active / tokens,
           "host_ms_per_token": {"launch": 1e3 * tt.launch_s / tokens, "wait_gpu": 1e3 * tt.cpu_wait_s / tokens,
                                 "prep": 1e3 * tt.prep_s / tokens, "kernel": 1e3 * tt.cpu_kernel_s / tokens,
                                 "post": 1e3 * tt.post_s / tokens},
           "ms_per_token_p90": 1e3 * per[int(0.9 * (len(per) - 1))]}
    if eng.cuda and gpu_probe:
        eng.time_gpu = True
        eng.totals = type(eng.totals)()
        for _ in range(gpu_probe):
            eng.step(None)
        eng.time_gpu = False
        g = eng.totals.gpu_s / gpu_probe
        res["gpu_busy_ms_per_token"] = g * 1e3
        res["gpu_GBps"] = eng.gpu_bytes_per_token() / g / 1e9 if g else None
    res["gpu_bytes_per_token"] = eng.gpu_bytes_per_token()
    res["engine"] = {"gpu_kernels": eng.gpu_kernels, "graphs": eng._graphs is not None,
                     "send_in_graph": eng.send_in_graph, "capture_error": eng.capture_error,
                     "graph_launches_per_token": eng.n_segments if eng._graphs is not None else 0,
                     "send_counter_spins": eng.tag_spins, "triton_fallback": fallback,
                     "cpu_threads": eng.kernel.threads}
    if eng.ops is not None and eng.ops.tuning_log:
        res["engine"]["gemv_tuning"] = eng.ops.tuning_log
    return res


# ---- hot sets ----------------------------------------------------------------------------------
def hot_sets(p, n_layers: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A Placement's hot and cold neuron ids per layer (int64)."""
    return ([p.hot_indices(l).astype(np.int64) for l in range(n_layers)],
            [p.cold_indices(l).astype(np.int64) for l in range(n_layers)])


def hot_mask(eng) -> np.ndarray:
    """[L, n_ff] bool: the neurons the built model holds on the GPU side now."""
    hm = np.zeros((eng.L, eng.cfg.n_ff), bool)
    for l, g in enumerate(eng.gl):
        hm[l][g.hot_ids] = True
    return hm


# ---- hotcold-<policy>: predictor mode ----------------------------------------------------------
def hotcold_run(ctx: BenchContext, name: str, p, f_work: np.ndarray, dynamic: bool = False,
                tokens: int | None = None) -> dict[str, Any]:
    """Placement `p` in predictor mode (a sampled predictor drawing from f_work), with online migration
    when `dynamic`; timed, predicted by the cost model, put against its bandwidth floor; stored as
    res["runs"][name]."""
    from hotcold.runtime.selectors import SampledPredictor

    cfg, o, dev, hw = ctx.cfg, ctx.o, ctx.dev, ctx.hw
    base = gpu_memory_start(dev)
    rss0 = rss_now_bytes()
    hot, cold = hot_sets(p, cfg.n_layers)
    sel = SampledPredictor(f_work, cfg.dim, ctx.rank, dev, ctx.dtype, seed=o.seed + 1)
    eng = build_model(ctx, hot, cold, "predictor", selector=sel)
    dyn = None
    if dynamic:
        from hotcold.runtime.dynamic import DynamicPlacement

        dyn = DynamicPlacement(eng, ctx.cm, ctx.f_match, every=o.dyn_every, max_swaps=o.dyn_max_swaps,
                               margin=o.dyn_margin)
    eng.kernel.warm_up(ctx.dtype)
    n = tokens or o.tokens
    r = run_engine(eng, n, o.warm)
    if dyn is not None:
        dyn.flush()
        r["migration"] = dyn.stats.to_json(n + o.warm)
        r["tau_history"] = [h for h in dyn.stats.history if "committed" in h][-8:]
        r["decisions"] = [h for h in dyn.stats.history if "swaps" in h][-8:]
    hm = hot_mask(eng)
    r["predicted"] = predict_ms(ctx.cm, f_work, hm)
    r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
    ctx.masks[name] = (hm, f_work, "predictor")
    for label, h in o.predict_hw:
        pr = predict_ms(ctx.cost_model(h, "predictor"), f_work, hm)
        r[f"predicted_{label}"] = pr
        r[f"model_error_{label}"] = pr["ms_per_token"] / r["ms_per_token"] - 1
    served = float((f_work * hm).sum())
    r["gpu_share"] = served / float(f_work.sum())
    r["gpu_share_measured"] = None
    cold_f = f_work[~hm]
    r["cold_density"] = float(cold_f.mean()) if cold_f.size else 0.0
    nb = neuron_bytes(cfg, ctx.dt_name).total
    cold_bytes = sum(float((f_work[l][~hm[l]]).sum()) * nb for l in range(cfg.n_layers))
    r["floor_ms"] = (eng.gpu_bytes_per_token() / hw.gpu.bandwidth + cold_bytes / hw.cpu.bandwidth) * 1e3
    r["floor_note"] = "GPU bytes / BW_gpu + active cold bytes / BW_cpu (sides serial: attention precedes the split)"
    r["ratio_to_floor"] = r["ms_per_token"] / r["floor_ms"]
    if o.floor_hw is not None:  # the same bytes over this machine's measured ceilings
        r["floor_ms_machine"] = (eng.gpu_bytes_per_token() / o.floor_hw.gpu.bandwidth
                                 + cold_bytes / o.floor_hw.cpu.bandwidth) * 1e3
        r["ratio_to_floor_machine"] = r["ms_per_token"] / r["floor_ms_machine"]
    r["memory"] = eng.memory()
    if dev.type == "cuda":
        r["peak_gpu_bytes_run"] = torch.cuda.max_memory_allocated(dev) - base
    r["rss_delta_bytes"] = rss_now_bytes() - rss0
    r["n_hot"] = int(hm.sum())
    r["predictor"] = "sampled from the workload's frequencies; low-rank predictor evaluated for timing only"
    ctx.extrapolate(r)
    ctx.res["runs"][name] = r
    ctx.log(f"{name}: {r['ms_per_token']:.2f} ms/token (model {r['predicted']['ms_per_token']:.2f}), "
            f"cpu {r['cpu_kernel_ms_per_token']:.2f} ms @ {r['cpu_GBps'] or 0:.0f} GB/s, share {r['gpu_share']:.3f}")
    del eng, sel, dyn
    free_cuda()
    ctx.checkpoint()
    return r


# ---- threshold mode and online t_l -------------------------------------------------------------
def threshold_run(ctx: BenchContext, p) -> None:
    """Placement `p` in threshold mode at t = GATE_T: the real activations of the scaled gate rows, the CPU
    reading every cold gate row (CATS). The measured cold density checks the gate scaling against the
    workload's frequencies. Then, on the same model, online t_l holding half that density."""
    cfg, o = ctx.cfg, ctx.o
    hot, cold = hot_sets(p, cfg.n_layers)
    eng = build_model(ctx, hot, cold, "threshold", thresholds=[GATE_T] * cfg.n_layers)
    eng.kernel.warm_up(ctx.dtype)
    r = run_engine(eng, max(8, o.tokens // 2), o.warm)
    n_cold = sum(c.n_cold for c in eng.cl)
    r["measured_cold_density"] = r["cold_active_per_token"] / max(n_cold, 1)
    fm = np.minimum(ctx.f_match, F_CAP)
    hm = hot_mask(eng)
    r["expected_cold_density"] = float(fm[~hm].mean()) if (~hm).any() else 0.0
    r["predicted"] = predict_ms(ctx.cost_model(ctx.hw, "threshold"), fm, hm)
    r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
    ctx.masks["hotcold-fixed-threshold"] = (hm, fm, "threshold")
    ctx.extrapolate(r)
    ctx.res["runs"]["hotcold-fixed-threshold"] = r
    ctx.log(f"threshold: {r['ms_per_token']:.2f} ms/token, cold density measured {r['measured_cold_density']:.3f} "
            f"vs {r['expected_cold_density']:.3f} expected")
    hold_density(ctx, eng, n_cold, target=max(0.01, 0.5 * r["measured_cold_density"]))
    del eng
    free_cuda()
    ctx.checkpoint()


def hold_density(ctx: BenchContext, eng, n_cold: int, target: float, tokens: int = 48) -> None:
    """Online t_l on a threshold-mode model: hold `target` density for `tokens` steps, record how t_l moved."""
    eng.hold_density(target, gain=0.2)
    eng.totals = type(eng.totals)()
    for _ in range(tokens):
        eng.step(None)
    tail = eng.totals
    ctx.res["runs"]["threshold-hold-density"] = {
        "target_density_all_neurons": target,
        "cold_side_density_over_run": tail.cold_active / max(n_cold, 1) / tail.tokens,
        "last_token_density_per_layer": [float(v) for v in getattr(eng, "last_density", [])],
        "t_start": GATE_T, "t_final": [float(v) for v in eng.thr],
        "t_history_every_8": eng.thr_history[::8], "ms_per_token": 1e3 * tail.seconds / tail.tokens}
    ctx.log(f"hold density {target:.3f}: t_l -> {np.round(eng.thr, 3).tolist()}")
