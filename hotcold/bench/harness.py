"""`hotcold bench`: the hybrid engine against the baselines a user would pick, at equal GPU budget.

The model is LLaMA-2-70B-shaped (or any named shape) with N layers of random weights generated on the
device, never read from disk (hotcold.bench.weights). Runs, each timed after a warm-up with the device
synchronised every token:
  dense-gpu, layer-split, stream   the baselines (hotcold.bench.baselines)
  hotcold-<policy>                 neuron split with a Placement (fixed / adaptive) in predictor mode
  hotcold-dynamic                  the fixed placement plus online migration (hotcold.runtime.dynamic)
  threshold                        the fixed placement in threshold mode, then online t_l (hotcold.bench.runs)
Workloads: `matched` (the profile the placements were made from) and `shifted` (another profile of the
same source model, mapped with the same neuron identities). The cost model's prediction (the solver's
CostModel on the workload's real frequencies and the actual hot sets) is reported beside each result,
and fitted to the run's measurements at the end (hotcold.bench.fits).
Every N-layer number is also extrapolated to the model's full depth (per-layer time × L + head),
labelled `extrapolated_*`.

`run_bench` reads top to bottom: prepare (workloads, budget, placements) -> weights -> baselines ->
hotcold runs -> fits; every part reads and writes one `BenchContext`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hotcold.bench import baselines, runs, weights
from hotcold.bench.fits import fit_hardware, summarize
from hotcold.bench.runs import free_cuda, rss_peak_bytes
from hotcold.bench.weights import scaled_budget
from hotcold.memory import neuron_bytes, placement_bytes
from hotcold.model.config import ModelConfig


@dataclass
class BenchOptions:
    shape: str = "llama2-70b"
    n_layers: int = 10
    gpu_budget_full: int = 48 * 10**9  # at the model's full depth
    cold_density: float | None = 0.10  # mean frequency of cold neurons under the fixed placement; None: as profiled
    tokens: int = 32
    warm: int = 16
    dyn_tokens: int = 192
    max_len: int = 512
    dtype: str = "float16"
    device: str = "auto"
    profiles: list[str] = field(default_factory=list)  # [matched, shifted] profile dirs
    placements: dict[str, str] = field(default_factory=dict)  # policy -> Placement dir (else solved here)
    hardware: str = "h200"  # preset or HardwareSpec JSON for the placements and predictions
    runs: tuple[str, ...] = ("dense-gpu", "layer-split", "stream", "hotcold-fixed", "hotcold-adaptive",
                             "hotcold-dynamic", "threshold")
    cpu_backend: str = "auto"
    cpu_threads: int | None = None
    cpu_group: int | None = None  # neurons the cold kernel streams side by side (None: its default)
    cpu_dynamic: bool | None = None  # the cold kernel's dynamic schedule (None: its default)
    seed: int = 0
    dyn_every: int = 16
    dyn_max_swaps: int = 512
    predictor_rank: int | None = None
    gpu_kernels: str = "auto"  # auto (Triton on CUDA when importable), triton, torch
    dyn_margin: float = 2.0  # dynamic mode's noise margin (standard errors)
    check: bool = True  # on CUDA: Triton vs torch GPU path on the first 2 layers, logits compared
    predict_hw: list = field(default_factory=list)  # [(label, HardwareSpec)]: more predictions beside the main one
    floor_hw: Any = None  # a HardwareSpec of this machine's measured ceilings: a second floor beside `hardware`'s
    log: Callable[[str], None] = print
    checkpoint: Callable[[dict], None] | None = None

@dataclass
class BenchContext:
    """One bench run's state, read and written by its parts (weights, baselines, runs, fits)."""

    o: BenchOptions
    cfg: ModelConfig  # the N layers that are built and run
    full: ModelConfig  # the same shape at its full depth: extrapolation and whole-layer budgets
    dev: torch.device
    dtype: torch.dtype
    dt_name: str  # canonical dtype name ("float16", ...)
    hw: Any  # HardwareSpec of the placements and predictions
    rank: int  # the predictor's rank
    res: dict[str, Any]  # the result, written as the runs finish
    t_start: float  # perf_counter at the start (elapsed_s)
    cm: Any = None  # CostModel, predictor mode: the hotcold runs' predictions and dynamic migration
    cm_exact: Any = None  # CostModel, exact mode: dense-gpu's prediction
    f_match: np.ndarray | None = None  # [N, n_ff] frequencies of the workload the placements were made from
    f_shift: np.ndarray | None = None  # another workload's, same neuron identities (None: only one)
    placements: dict[str, Any] = field(default_factory=dict)  # policy -> Placement
    glob: dict[str, torch.Tensor] = field(default_factory=dict)  # tok_embeddings, norm, output
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)  # the generated layers' tensors
    head_ms: float = 0.0  # LM head time added to every extrapolation: modelled, then measured by dense-gpu
    masks: dict[str, tuple] = field(default_factory=dict)  # run -> (hot mask, frequencies, cold mode), for the fit

    def log(self, s: str) -> None:
        self.o.log(s)

    def checkpoint(self) -> None:
        self.res["elapsed_s"] = time.perf_counter() - self.t_start
        if self.o.checkpoint:
            self.o.checkpoint(self.res)

    def cost_model(self, hw, mode: str):
        """The solver's CostModel for this run's model on `hw` in cold mode `mode`."""
        from hotcold.solver.costmodel import CostModel

        kw = {"predictor_rank": self.rank} if mode == "predictor" else {}
        return CostModel(self.cfg, hw, self.dt_name, cold_mode=mode, ctx_len=self.o.max_len, **kw)

    def extrapolate(self, r: dict[str, Any]) -> None:
        """Add the per-layer time and the full-depth extrapolation (per layer × L + head) to run `r`."""
        per_layer = (r["ms_per_token"] - self.head_ms) / self.cfg.n_layers
        r["per_layer_ms"] = per_layer
        r["extrapolated_ms_per_token_full_depth"] = per_layer * self.full.n_layers + self.head_ms
        r["extrapolated_tokens_per_s_full_depth"] = 1e3 / r["extrapolated_ms_per_token_full_depth"]


def run_bench(o: BenchOptions) -> dict[str, Any]:
    """Every run `o` asks for, in order; the result (also handed to o.checkpoint after each run)."""
    ctx = start(o)
    prep = prepare(o, ctx.cfg, ctx.dt_name, ctx.hw, ctx.rank, ctx.res)
    ctx.f_match, ctx.f_shift, ctx.placements = prep["f_match"], prep["f_shift"], prep["placements"]
    ctx.checkpoint()

    weights.generate(ctx)
    ctx.cm = ctx.cost_model(ctx.hw, "predictor")
    ctx.cm_exact = ctx.cost_model(ctx.hw, "exact")
    ctx.head_ms = 1e3 * ctx.cm.head_s  # modelled; dense-gpu measures it
    ctx.res["hardware_for_predictions"] = ctx.hw.to_json()
    if o.floor_hw is not None:
        ctx.res["hardware_machine_floor"] = o.floor_hw.to_json()
    if o.check and ctx.dev.type == "cuda" and o.gpu_kernels != "torch":
        ctx.res["check_triton_vs_torch"] = check_gpu_paths(ctx.cfg, ctx.glob, ctx.layers, ctx.dev, ctx.dtype,
                                                           o.max_len)
        ctx.log(f"check: {ctx.res['check_triton_vs_torch']}")
        ctx.checkpoint()

    # baselines: the layer split and streaming are composed from dense-gpu's per-layer time
    if {"dense-gpu", "layer-split", "stream"} & set(o.runs):
        t_gpu_layer = baselines.dense_gpu_run(ctx)["per_layer_ms"]
        if "layer-split" in o.runs:
            baselines.layer_split_run(ctx, t_gpu_layer)
        if "stream" in o.runs and ctx.dev.type == "cuda":
            baselines.stream_run(ctx, t_gpu_layer)

    # hotcold: each placement on both workloads; dynamic against fixed on longer runs
    pl, f_match, f_shift = ctx.placements, ctx.f_match, ctx.f_shift
    for pol in ("fixed", "adaptive"):
        if f"hotcold-{pol}" in o.runs:
            runs.hotcold_run(ctx, f"hotcold-{pol}", pl[pol], f_match)
            if f_shift is not None:
                runs.hotcold_run(ctx, f"hotcold-{pol}@shifted", pl[pol], f_shift)
    if "hotcold-dynamic" in o.runs:
        runs.hotcold_run(ctx, "hotcold-fixed-long", pl["fixed"], f_match, tokens=o.dyn_tokens)
        runs.hotcold_run(ctx, "hotcold-dynamic", pl["fixed"], f_match, dynamic=True, tokens=o.dyn_tokens)
        if f_shift is not None:
            runs.hotcold_run(ctx, "hotcold-fixed@shifted-long", pl["fixed"], f_shift, tokens=o.dyn_tokens)
            runs.hotcold_run(ctx, "hotcold-dynamic@shifted", pl["fixed"], f_shift, dynamic=True, tokens=o.dyn_tokens)
    if "threshold" in o.runs and "fixed" in pl:
        runs.threshold_run(ctx, pl["fixed"])

    # fits and the summary
    if "hotcold-fixed" in ctx.res["runs"] and "dense-gpu" in ctx.res["runs"]:
        fit_hardware(ctx.res, ctx.hw, ctx.cfg, ctx.dt_name, o, ctx.masks, ctx.rank)
        ctx.checkpoint()
    ctx.res["peak_rss_bytes"] = rss_peak_bytes()
    if ctx.dev.type == "cuda":
        ctx.res["peak_gpu_bytes_process"] = torch.cuda.max_memory_reserved(ctx.dev)
    ctx.res["summary"] = summarize(ctx.res)
    ctx.checkpoint()
    return ctx.res


def start(o: BenchOptions) -> BenchContext:
    """The N-layer model, device, dtype and hardware of `o`, and the result's header."""
    from hotcold.devices import resolve_device
    from hotcold.memory import canonical_dtype, default_predictor_rank
    from hotcold.model.config import shape
    from hotcold.runtime.coldkernel import default_dynamic, default_group
    from hotcold.solver.hardware import resolve

    t_start = time.perf_counter()
    full = shape(o.shape)
    cfg = full.replace(n_layers=o.n_layers, max_seq_len=max(o.max_len, 64))
    dt_name = canonical_dtype(o.dtype)
    dev = resolve_device(o.device)
    hw = resolve(path=o.hardware) if str(o.hardware).endswith(".json") else resolve(preset_name=o.hardware)
    rank = o.predictor_rank or default_predictor_rank(cfg)
    res: dict[str, Any] = {"benchmark": "hotcold bench: hybrid GPU+CPU decode vs baselines, batch 1",
                           "cpu_kernel": {"backend": o.cpu_backend, "threads": o.cpu_threads, "group": o.cpu_group or default_group(),
                                          "dynamic": default_dynamic() if o.cpu_dynamic is None else o.cpu_dynamic,
                                          "numba_threading_layer": os.environ.get("NUMBA_THREADING_LAYER"),
                                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                           "weights": "random (generated on the device); not a trained model",
                           "shape": o.shape, "n_layers": o.n_layers, "full_depth_layers": full.n_layers,
                           "dtype": dt_name, "device": str(dev), "max_len": o.max_len, "runs": {},
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
                           "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        res["gpu_name"] = torch.cuda.get_device_name(dev)
    return BenchContext(o=o, cfg=cfg, full=full, dev=dev, dtype=getattr(torch, dt_name), dt_name=dt_name, hw=hw,
                        rank=rank, res=res, t_start=t_start)


def prepare(o: BenchOptions, cfg: ModelConfig, dt_name: str, hw, rank: int, res: dict[str, Any]) -> dict[str, Any]:
    """Workload frequencies (mapped, rescaled to the cold density), the scaled budget and the placements."""
    from hotcold.workloads import frequencies as wl
    from hotcold.model.config import shape

    log = o.log
    full = shape(o.shape)
    # workloads --------------------------------------------------------------------------------
    if o.profiles:
        srcs, infos = zip(*[wl.load_frequencies(p) for p in o.profiles])
        fs = wl.map_by_depth(list(srcs), cfg.n_layers, cfg.n_ff, seed=o.seed)
        res["workloads"] = {"method": "source profile layers mapped by relative depth, neurons by a shared "
                                      "random map with log-normal jitter 0.25 (hotcold.workloads.frequencies)",
                            "profiles": list(infos)}
    else:
        f0 = wl.synthetic(cfg.n_layers, cfg.n_ff, o.seed)
        fs = [f0, wl.shifted(f0, 0.3, o.seed + 1)]
        res["workloads"] = {"method": "synthetic power law (no profile given); shifted: 30% of each layer's "
                                      "neurons trade frequencies"}
    budget = scaled_budget(cfg, full.n_layers, o.gpu_budget_full, dt_name)
    nb = neuron_bytes(cfg, dt_name).total
    fixed_gpu = placement_bytes(cfg, [0] * cfg.n_layers, dt_name, ctx_len=o.max_len, cold_mode="predictor",
                                predictor_rank=rank).gpu_fixed
    k_total = max(0, (budget - fixed_gpu) // nb)
    gamma = 1.0
    if o.cold_density is not None:
        hot0 = wl.global_top_k_mask(fs[0], int(k_total))
        gamma = wl.density_power(fs[0], ~hot0, o.cold_density)
        fs = [np.clip(f, 0, 1) ** gamma for f in fs]
    f_match = fs[0]
    f_shift = fs[1] if len(fs) > 1 else None
    res["budget"] = {"gpu_budget_full_depth": o.gpu_budget_full, "gpu_budget_scaled": budget,
                     "scaling": "(B - non-layer tensors) x N / L_full + non-layer tensors",
                     "hot_neurons_that_fit": int(k_total), "density_power_gamma": gamma,
                     "target_cold_density": o.cold_density}
    res["workloads"]["mean_density"] = {"matched": float(f_match.mean()),
                                        "shifted": float(f_shift.mean()) if f_shift is not None else None}
    log(f"budget {budget / 1e9:.2f} GB for {cfg.n_layers} layers, {k_total} hot neurons fit, gamma {gamma:.3f}")

    # placements -------------------------------------------------------------------------------
    placements = {}
    for pol in ("fixed", "adaptive"):
        if f"hotcold-{pol}" not in o.runs and not (pol == "fixed" and "hotcold-dynamic" in o.runs):
            continue
        from hotcold.solver.placement import Placement

        if pol in o.placements:
            placements[pol] = Placement.load(o.placements[pol])
        else:
            from hotcold.solver.solve import solve_frequencies

            placements[pol] = solve_frequencies(f_match, cfg, hw, policy=pol, gpu_budget=budget,
                                                cold_mode="predictor", ctx_len=o.max_len, dtype=dt_name,
                                                predictor_rank=rank, time_limit=120)
        p = placements[pol]
        res.setdefault("placements", {})[pol] = {**p.summary(), "n_hot": [int(v) for v in p.n_hot]}
        log(f"placement {pol}: {int(p.n_hot.sum())} hot, modelled {p.totals['modelled_ms_per_token']:.2f} ms")

    return {"fs": fs, "f_match": f_match, "f_shift": f_shift, "budget": budget, "k_total": k_total,
            "placements": placements}


def check_gpu_paths(cfg: ModelConfig, glob: dict, layers: list, dev, dtype: torch.dtype, max_len: int,
                    n_layers: int = 2, tokens: int = 4) -> dict[str, Any]:
    """The Triton GPU path against the torch one on the first `n_layers` layers (all hot, exact mode):
    the relative difference of the logits over a few decoded tokens (same tokens fed to both)."""
    from hotcold.runtime.build import split_layer
    from hotcold.runtime.model import HybridModel

    c2 = cfg.replace(n_layers=n_layers)
    out = {}
    logits = {}
    for kern in ("triton", "torch"):
        gls, cls = [], []
        for l in range(n_layers):
            g, c = split_layer(dict(layers[l]), np.arange(cfg.n_ff), cfg.n_ff, dev, dtype)
            gls.append(g)
            cls.append(c)
        eng = HybridModel(c2, glob["tok_embeddings"], glob["norm"], glob["output"], gls, cls, cold_mode="exact",
                           max_len=max_len, gpu_kernels=kern, graphs=False)
        rows = []
        with torch.inference_mode():
            for t in range(tokens):
                eng.step(3 + 7 * t)
                rows.append(eng.logits.clone())
        logits[kern] = torch.stack(rows)
        out[f"{kern}_path"] = eng.gpu_kernels
        del eng, gls, cls
        free_cuda()
    a, b = logits["triton"], logits["torch"]
    out["rel_diff_logits"] = float((a - b).norm() / b.norm())
    out["argmax_agree"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return out


def save_json(obj: Any, path: str | Path) -> None:
    from hotcold.artifacts import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n")
