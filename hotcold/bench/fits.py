"""The cost model against the measurements: its prediction for given hot sets, the hardware fit (three
parameters fixed from one run, every run predicted again), and the summary ratios of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hotcold.model.config import ModelConfig

if TYPE_CHECKING:
    from hotcold.bench.harness import BenchOptions


def predict_ms(cm, f_work: np.ndarray, hot_masks: np.ndarray) -> dict[str, Any]:
    """The solver's cost model for given hot sets [L, n_ff] (bool) and the workload's real frequencies."""
    L = f_work.shape[0]
    per = []
    for l in range(L):
        hot = hot_masks[l]
        g = float(cm.gpu_neuron_s(f_work[l][hot]).sum())
        c = float(cm.cpu_neuron_s(f_work[l][~hot]).sum())
        sync = getattr(cm, "split_s", cm.sync_s) if (~hot).any() else 0.0  # sync + host overhead
        tot = cm.pre_s + (max(g, c) if cm.overlap else g + c) + sync
        per.append({"gpu": g * 1e3, "cpu": c * 1e3, "total": tot * 1e3})
    layers = sum(p["total"] for p in per)
    return {"ms_per_token": layers + cm.head_s * 1e3, "layers_ms": layers, "head_ms": cm.head_s * 1e3,
            "pre_ms_per_layer": cm.pre_s * 1e3, "gpu_ms": sum(p["gpu"] for p in per),
            "cpu_ms": sum(p["cpu"] for p in per)}


def fit_hardware(res: dict[str, Any], hw, cfg: ModelConfig, dt_name: str, o: BenchOptions, masks: dict,
                 rank: int) -> None:
    """Fix the cost model's parameters with what this run measured, and predict every run again.

    gpu.bandwidth  = the all-GPU run's achieved weight+KV bytes per second
    cpu.bandwidth  = hotcold-fixed's cold-kernel bytes per second
    per split layer = hotcold-fixed's time not explained by the model with the two above and no sync
                     (exchange, launches, host work around the kernel): link.host_overhead_seconds beyond
                     the measured sync where the HardwareSpec has that field, else link.sync_seconds
    Fitted on hotcold-fixed (and dense-gpu); every other run is an out-of-sample check. Skipped (and said
    so in res["hardware_fit_skipped"]) when hotcold-fixed has no cold neurons.
    """
    import dataclasses

    from hotcold.solver.costmodel import CostModel

    R = res["runs"]
    d, f = R["dense-gpu"], R["hotcold-fixed"]
    if f["cpu_GBps"] is None:  # every neuron fit the GPU budget: no cold-kernel rate to fit cpu.bandwidth on
        res["hardware_fit_skipped"] = "hotcold-fixed computed no cold neurons (the budget holds them all)"
        return
    gpu_bw = d["gpu_bytes_per_token"] / (d["ms_per_token"] * 1e-3)
    cpu_bw = f["cpu_GBps"] * 1e9
    base = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, bandwidth=gpu_bw),
                               cpu=dataclasses.replace(hw.cpu, bandwidth=cpu_bw),
                               link=dataclasses.replace(hw.link, sync_seconds=0.0))
    hm, fw, _ = masks["hotcold-fixed"]
    p0 = predict_ms(CostModel(cfg, base, dt_name, cold_mode="predictor", ctx_len=o.max_len, predictor_rank=rank), fw, hm)
    n_split = int((~hm).any(axis=1).sum())
    extra = max(0.0, (f["ms_per_token"] - p0["ms_per_token"]) * 1e-3 / max(n_split, 1))
    if hasattr(base.link, "host_overhead_seconds"):
        # the measured round trip stays the sync (it sets C_l); the rest is host overhead per split layer
        sync = min(extra, hw.link.sync_seconds)
        link = dataclasses.replace(base.link, sync_seconds=sync, host_overhead_seconds=extra - sync)
        note = {"link.sync_seconds": "the preset's (measured round trip), capped by what was not explained",
                "link.host_overhead_seconds": "fitted: hotcold-fixed time not explained, per split layer, less the sync"}
    else:
        link = dataclasses.replace(base.link, sync_seconds=extra)
        note = {"link.sync_seconds": "fitted: hotcold-fixed time not explained, per split layer"}
    fitted = dataclasses.replace(base, name=f"{hw.name}-fitted", link=link,
                                 source="fitted by hotcold bench (hotcold.bench.fits.fit_hardware)",
                                 notes={**hw.notes, "gpu.bandwidth": "fitted: dense-gpu run, achieved",
                                        "cpu.bandwidth": "fitted: hotcold-fixed run, cold kernel achieved", **note})
    res["hardware_fitted"] = fitted.to_json()
    for name, (m, fwork, mode) in masks.items():
        kw = {"predictor_rank": rank} if mode == "predictor" else {}
        pr = predict_ms(CostModel(cfg, fitted, dt_name, cold_mode=mode, ctx_len=o.max_len, **kw), fwork, m)
        R[name]["predicted_fitted_hw"] = pr
        R[name]["model_error_fitted_hw"] = pr["ms_per_token"] / R[name]["ms_per_token"] - 1
    pr = predict_ms(CostModel(cfg, fitted, dt_name, cold_mode="exact", ctx_len=o.max_len), fw,
                    np.ones_like(hm))
    d["predicted_fitted_hw"] = pr
    d["model_error_fitted_hw"] = pr["ms_per_token"] / d["ms_per_token"] - 1


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The acceptance ratios of docs/gpu.md (hotcold against its floor, layer split and streaming; the cost
    model's errors; dynamic against fixed), from one run."""
    R = res["runs"]
    out: dict[str, Any] = {}

    def x(name, key="extrapolated_ms_per_token_full_depth"):
        return R.get(name, {}).get(key)

    hc = x("hotcold-adaptive") or x("hotcold-fixed")
    hc_name = "hotcold-adaptive" if x("hotcold-adaptive") else "hotcold-fixed"
    if hc:
        out["hotcold_run"] = hc_name
        out["hotcold_ms_full_depth"] = hc
        out["hotcold_over_floor"] = R[hc_name].get("ratio_to_floor")
        out["hotcold_over_floor_machine"] = R[hc_name].get("ratio_to_floor_machine")
        out["hotcold_fixed_over_floor"] = R.get("hotcold-fixed", {}).get("ratio_to_floor")
        out["hotcold_fixed_over_floor_machine"] = R.get("hotcold-fixed", {}).get("ratio_to_floor_machine")
        if x("layer-split"):
            out["speedup_vs_layer_split"] = x("layer-split") / hc
        if x("stream"):
            out["speedup_vs_stream_overlapped"] = x("stream") / hc
            out["speedup_vs_stream_sequential"] = x("stream", "extrapolated_ms_per_token_full_depth_sequential") / hc
    if "dense-gpu" in R:
        out["dense_gpu_over_floor"] = R["dense-gpu"]["ratio_to_floor"]
        out["dense_gpu_over_floor_machine"] = R["dense-gpu"].get("ratio_to_floor_machine")
    errs = {k: v.get("model_error") for k, v in R.items() if v.get("model_error") is not None}
    out["model_error"] = errs
    out["model_error_fitted_hw"] = {k: v.get("model_error_fitted_hw") for k, v in R.items()
                                    if v.get("model_error_fitted_hw") is not None}
    if "hotcold-dynamic" in R and "hotcold-fixed-long" in R:
        out["dynamic_speedup_matched"] = R["hotcold-fixed-long"]["ms_per_token"] / R["hotcold-dynamic"]["ms_per_token"]
    if "hotcold-dynamic@shifted" in R and "hotcold-fixed@shifted-long" in R:
        out["dynamic_speedup_on_shift"] = (R["hotcold-fixed@shifted-long"]["ms_per_token"]
                                           / R["hotcold-dynamic@shifted"]["ms_per_token"])
        out["dynamic_migration"] = R["hotcold-dynamic@shifted"].get("migration")
    return out
