"""`hotcold bench`: the hybrid engine against the baselines a user would pick, at equal GPU budget.

The model is LLaMA-2-70B-shaped (or any named shape) with N layers of random weights generated on the
device (never read from disk). Gate rows are scaled so that, under the gate rule |silu(g_i)| > t with
t = GATE_T, neuron i fires with about the workload's frequency f_i (g_i = w_i·x is close to
N(0, s_i² · mean(ffn_norm²)) for rms-normed x, so s_i = silu⁻¹(t) / Φ⁻¹(1 − f_i), with f capped at
F_CAP); the `threshold` numbers check that.

Runs, each timed after a warm-up with the device synchronised every token:
  dense-gpu          every neuron hot: the all-on-GPU dense model (when it fits), also "budget ≥ model"
  layer-split        llama.cpp -ngl style: k whole layers on the GPU, the rest computed on the CPU.
                     Measured per layer (a GPU layer, a CPU layer with the dense reference model's
                     fp16 F.linear path) and composed: k·T_gpu + (N − k)·T_cpu + head
  stream             accelerate style: non-resident layers copied over PCIe every token. Measured per
                     streamed layer both overlapped (prefetch on a side stream: the best case) and
                     sequential (copy, then compute: what accelerate's hooks do), then composed
  hotcold-<policy>   neuron split with a Placement (fixed / adaptive) in predictor mode
  hotcold-dynamic    the fixed placement plus online migration (hotcold.runtime.dynamic)
Workloads: `matched` (the profile the placements were made from) and `shifted` (another profile of the
same source model, mapped with the same neuron identities). The cost model's prediction (the solver's
CostModel on the workload's real frequencies and the actual hot sets) is reported beside each result.
Every N-layer number is also extrapolated to the model's full depth (per-layer time × L + head),
labelled `extrapolated_*`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hotcold.memory import dense_bytes, neuron_bytes
from hotcold.model.config import ModelConfig
# the gate-row scaling that gives neuron i its workload frequency is the random model's (one definition)
from hotcold.model.random import F_CAP, GATE_T, gate_scales


# ---- the model ---------------------------------------------------------------------------------
def generate_weights(cfg: ModelConfig, gate_f: np.ndarray, device, dtype: torch.dtype, seed: int = 0):
    """Random weights on `device`: (globals {tok_embeddings, norm, output}, [layer dicts, our names])."""
    g = torch.Generator(device=device).manual_seed(seed)
    D, Fn, Hd = cfg.dim, cfg.n_ff, cfg.head_dim

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    glob = {"tok_embeddings": rn(cfg.vocab_size, D), "norm": (1 + rn(D, scale=0.1).float()).to(dtype),
            "output": rn(cfg.vocab_size, D, scale=D ** -0.5)}
    layers = []
    for l in range(cfg.n_layers):
        s = torch.as_tensor(gate_scales(gate_f[l]), dtype=torch.float32, device=device)
        wg = (torch.randn(Fn, D, generator=g, device=device) * (D ** -0.5) * s[:, None]).to(dtype)
        layers.append({
            "attn_norm": (1 + rn(D, scale=0.1).float()).to(dtype), "ffn_norm": (1 + rn(D, scale=0.1).float()).to(dtype),
            "wq": rn(cfg.n_heads * Hd, D, scale=D ** -0.5), "wk": rn(cfg.n_kv_heads * Hd, D, scale=D ** -0.5),
            "wv": rn(cfg.n_kv_heads * Hd, D, scale=D ** -0.5), "wo": rn(D, cfg.n_heads * Hd, scale=(cfg.n_heads * Hd) ** -0.5),
            "w_gate": wg, "w_up": rn(Fn, D, scale=D ** -0.5), "w_down": rn(D, Fn, scale=Fn ** -0.5)})
    return glob, layers


def nonlayer_bytes(cfg: ModelConfig, dtype: str) -> int:
    d = dense_bytes(cfg, dtype)
    return d.embedding + d.lm_head + d.final_norm


def scaled_budget(cfg_n: ModelConfig, full_layers: int, budget_full: int, dtype: str) -> int:
    """A full-depth GPU budget scaled to cfg_n's N layers: (B − non-layer) · N / L_full + non-layer."""
    nl = nonlayer_bytes(cfg_n, dtype)
    return int((budget_full - nl) * cfg_n.n_layers / full_layers + nl)


# ---- the cost model's prediction -----------------------------------------------------------------
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


# ---- timing helpers ----------------------------------------------------------------------------
def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn: Callable[[], Any], reps: int, dev, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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


# ---- baselines ---------------------------------------------------------------------------------
def cpu_layer_seconds(cfg: ModelConfig, layer: dict[str, torch.Tensor], dtype: torch.dtype, reps: int = 5,
                      max_len: int = 512) -> float:
    """One decoder layer, dense, on the CPU (the reference model's decode path, fp16 F.linear)."""
    from hotcold.model.dense import KVCache, LayerWeights, Rope, block_forward

    lw = LayerWeights.from_tensors({k: v.to("cpu") for k, v in layer.items()}).for_decode()
    c1 = cfg.replace(n_layers=1)
    rope = Rope(c1, max_len)
    cache = KVCache(c1, 1, max_len, dtype, "cpu")
    h = torch.randn(1, 1, cfg.dim).to(dtype)
    pos = [8]

    def one():
        block_forward(c1, 0, lw, h, pos[0], rope, cache)
        pos[0] += 1

    with torch.inference_mode():
        return _median_time(one, reps, "cpu")


def stream_layer_seconds(cfg: ModelConfig, layer: dict[str, torch.Tensor], dtype: torch.dtype, device,
                         reps: int = 6) -> dict[str, float]:
    """Per streamed layer: copy its weights from pinned memory, compute on the GPU.

    overlapped: the next layer's copy runs on a side stream during this layer's compute (best case);
    sequential: copy then compute (accelerate's offload hooks).
    """
    import torch.nn.functional as F

    names = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
    host = [{n: layer[n].to("cpu").pin_memory() for n in names} for _ in range(2)]
    dev_bufs = [{n: torch.empty_like(layer[n], device=device) for n in names} for _ in range(2)]
    x = torch.randn(cfg.dim, device=device).to(dtype)
    nbytes = sum(layer[n].numel() * layer[n].element_size() for n in names)

    def compute(w):
        q = F.linear(x, torch.cat([w["wq"], w["wk"], w["wv"]]))  # the layer's reads, dense
        o = F.linear(x, w["wo"]) + q[: cfg.dim] * 0
        a = F.silu(F.linear(o, w["w_gate"])) * F.linear(o, w["w_up"])
        return F.linear(a, w["w_down"])

    def copy(i, stream=None):
        for n in names:
            dev_bufs[i][n].copy_(host[i][n], non_blocking=True)

    side = torch.cuda.Stream(device)

    def overlapped(nl=4):
        ev = [torch.cuda.Event() for _ in range(nl)]
        with torch.cuda.stream(side):
            copy(0)
            ev[0].record(side)
        for i in range(nl):
            torch.cuda.current_stream().wait_event(ev[i])
            if i + 1 < nl:
                side.wait_stream(torch.cuda.current_stream())  # the buffer it overwrites was used 2 layers ago
                with torch.cuda.stream(side):
                    copy((i + 1) % 2)
                    ev[i + 1].record(side)
            compute(dev_bufs[i % 2])

    def sequential(nl=4):
        for i in range(nl):
            copy(i % 2)
            compute(dev_bufs[i % 2])

    with torch.inference_mode():
        t_ov = _median_time(overlapped, reps, device) / 4
        t_seq = _median_time(sequential, reps, device) / 4
        t_cmp = _median_time(lambda: compute(dev_bufs[0]), reps, device)
    del host, dev_bufs
    return {"overlapped_s": t_ov, "sequential_s": t_seq, "compute_s": t_cmp, "bytes": nbytes,
            "pcie_GBps_effective": nbytes / t_ov / 1e9}


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


def run_bench(o: BenchOptions) -> dict[str, Any]:
    from hotcold.workloads import frequencies as wl
    from hotcold.runtime.build import split_layer
    from hotcold.runtime.model import HybridModel
    from hotcold.runtime.coldkernel import default_dynamic, default_group
    from hotcold.runtime.selectors import SampledPredictor
    from hotcold.memory import canonical_dtype, default_predictor_rank
    from hotcold.model.config import shape
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import resolve

    t_start = time.perf_counter()
    log = o.log
    full = shape(o.shape)
    cfg = full.replace(n_layers=o.n_layers, max_seq_len=max(o.max_len, 64))
    dt_name = canonical_dtype(o.dtype)
    tdtype = getattr(torch, dt_name)
    dev = torch.device("cuda" if (o.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if o.device == "auto" else o.device))
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        from hotcold.errors import InputError

        raise InputError("--device cuda was asked for but this torch sees no CUDA device", "use --device cpu or auto")
    if dev.type == "cuda":
        res["gpu_name"] = torch.cuda.get_device_name(dev)

    def ckpt():
        res["elapsed_s"] = time.perf_counter() - t_start
        if o.checkpoint:
            o.checkpoint(res)

    prep = prepare(o, cfg, dt_name, hw, rank, res)
    nb = neuron_bytes(cfg, dt_name).total
    fs, f_match, f_shift, budget, k_total, placements = (prep[k] for k in (
        "fs", "f_match", "f_shift", "budget", "k_total", "placements"))
    ckpt()

    # weights ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    glob, layers = generate_weights(cfg, f_match, dev, tdtype, o.seed)
    _sync(dev)
    res["weight_generation_s"] = time.perf_counter() - t0
    log(f"weights generated in {res['weight_generation_s']:.1f} s")

    cm_args = dict(cold_mode="predictor", ctx_len=o.max_len, predictor_rank=rank)
    cm = CostModel(cfg, hw, dt_name, **cm_args)
    cm_exact = CostModel(cfg, hw, dt_name, cold_mode="exact", ctx_len=o.max_len)
    res["hardware_for_predictions"] = hw.to_json()
    if o.floor_hw is not None:
        res["hardware_machine_floor"] = o.floor_hw.to_json()

    def engine_for(hot_ids, cold_ids, mode, selector=None, thresholds=None):
        gls, cls = [], []
        for l in range(cfg.n_layers):
            t = dict(layers[l])
            t["cold_ids"] = cold_ids[l]
            g, c = split_layer(t, hot_ids[l], cfg.n_ff, dev, tdtype)
            gls.append(g)
            cls.append(c)
        return HybridModel(cfg, glob["tok_embeddings"], glob["norm"], glob["output"], gls, cls, cold_mode=mode,
                            max_len=o.max_len, selector=selector, thresholds=thresholds, gpu_kernels=o.gpu_kernels,
                            cpu_backend=o.cpu_backend, cpu_threads=o.cpu_threads, cpu_group=o.cpu_group,
                            cpu_dynamic=o.cpu_dynamic)

    if o.check and dev.type == "cuda" and o.gpu_kernels != "torch":
        res["check_triton_vs_torch"] = check_gpu_paths(cfg, glob, layers, dev, tdtype, o.max_len)
        log(f"check: {res['check_triton_vs_torch']}")
        ckpt()

    def extrap(r: dict, head_ms: float) -> None:
        per_layer = (r["ms_per_token"] - head_ms) / cfg.n_layers
        r["per_layer_ms"] = per_layer
        r["extrapolated_ms_per_token_full_depth"] = per_layer * full.n_layers + head_ms
        r["extrapolated_tokens_per_s_full_depth"] = 1e3 / r["extrapolated_ms_per_token_full_depth"]

    head_ms = 1e3 * cm.head_s  # modelled; measured below when dense-gpu runs
    all_ids = [np.arange(cfg.n_ff)] * cfg.n_layers
    none_ids = [np.zeros(0, dtype=np.int64)] * cfg.n_layers

    # dense on the GPU ---------------------------------------------------------------------------
    t_gpu_layer = None
    if "dense-gpu" in o.runs or "layer-split" in o.runs or "stream" in o.runs:
        free_cuda()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        eng = engine_for(all_ids, none_ids, "exact")
        r = run_engine(eng, o.tokens, o.warm)
        r["segments_per_token"] = eng.n_segments
        head_s = _median_time(lambda: torch.nn.functional.linear(glob["norm"], glob["output"]), 20, dev)
        head_ms = head_s * 1e3
        r["head_ms_measured"] = head_ms
        floor_bytes = eng.gpu_bytes_per_token()
        r["floor_ms"] = floor_bytes / hw.gpu.bandwidth * 1e3
        r["ratio_to_floor"] = r["ms_per_token"] / r["floor_ms"]
        if o.floor_hw is not None:
            r["floor_ms_machine"] = floor_bytes / o.floor_hw.gpu.bandwidth * 1e3
            r["ratio_to_floor_machine"] = r["ms_per_token"] / r["floor_ms_machine"]
        r["memory"] = eng.memory()
        if dev.type == "cuda":
            r["peak_gpu_bytes_run"] = torch.cuda.max_memory_allocated(dev) - base
        r["predicted"] = predict_ms(cm_exact, f_match, np.ones((cfg.n_layers, cfg.n_ff), bool))
        r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
        for label, h in o.predict_hw:
            pr = predict_ms(CostModel(cfg, h, dt_name, cold_mode="exact", ctx_len=o.max_len), f_match,
                            np.ones((cfg.n_layers, cfg.n_ff), bool))
            r[f"predicted_{label}"] = pr
            r[f"model_error_{label}"] = pr["ms_per_token"] / r["ms_per_token"] - 1
        r["gpu_share"] = 1.0
        extrap(r, head_ms)
        t_gpu_layer = r["per_layer_ms"]
        res["runs"]["dense-gpu"] = r
        log(f"dense-gpu: {r['ms_per_token']:.2f} ms/token, floor {r['floor_ms']:.2f} ({r['ratio_to_floor']:.2f}x)")
        del eng
        free_cuda()
        ckpt()

    # budget in whole layers (layer split, streaming)
    layer_bytes = dense_bytes(cfg, dt_name).per_layer + 3 * cfg.n_ff * cfg.dim * torch.finfo(tdtype).bits // 8
    kv_layer = 2 * o.max_len * cfg.n_kv_heads * cfg.head_dim * torch.finfo(tdtype).bits // 8
    k_full = int((o.gpu_budget_full - nonlayer_bytes(cfg, dt_name)) // (layer_bytes + kv_layer))
    k_full = max(0, min(full.n_layers, k_full))
    if "layer-split" in o.runs and t_gpu_layer is not None:
        t_cpu = cpu_layer_seconds(cfg, layers[0], tdtype, max_len=o.max_len) * 1e3
        n_cpu = full.n_layers - k_full
        r = {"method": "composed from measured per-layer times: k GPU layers + (L - k) CPU layers + head",
             "gpu_layers_full_depth": k_full, "cpu_layers_full_depth": n_cpu,
             "gpu_layer_ms": t_gpu_layer, "cpu_layer_ms": t_cpu,
             "cpu_layer_GBps": layer_bytes / (t_cpu * 1e-3) / 1e9,
             "extrapolated_ms_per_token_full_depth": k_full * t_gpu_layer + n_cpu * t_cpu + head_ms,
             "floor_ms_full_depth": (k_full * layer_bytes / hw.gpu.bandwidth + n_cpu * layer_bytes / hw.cpu.bandwidth) * 1e3}
        r["extrapolated_tokens_per_s_full_depth"] = 1e3 / r["extrapolated_ms_per_token_full_depth"]
        res["runs"]["layer-split"] = r
        log(f"layer-split: GPU layer {t_gpu_layer:.3f} ms, CPU layer {t_cpu:.2f} ms -> "
            f"{r['extrapolated_ms_per_token_full_depth']:.0f} ms/token at {full.n_layers} layers")
        ckpt()
    if "stream" in o.runs and dev.type == "cuda" and t_gpu_layer is not None:
        s = stream_layer_seconds(cfg, layers[0], tdtype, dev)
        n_str = full.n_layers - k_full
        r = {"method": "composed from measured per-layer times: k resident layers + (L - k) streamed layers + head",
             "resident_layers_full_depth": k_full, "streamed_layers_full_depth": n_str,
             "streamed_layer_ms_overlapped": s["overlapped_s"] * 1e3, "streamed_layer_ms_sequential": s["sequential_s"] * 1e3,
             "streamed_layer_compute_ms": s["compute_s"] * 1e3, "pcie_GBps_effective": s["pcie_GBps_effective"],
             "extrapolated_ms_per_token_full_depth": k_full * t_gpu_layer + n_str * s["overlapped_s"] * 1e3 + head_ms,
             "extrapolated_ms_per_token_full_depth_sequential": k_full * t_gpu_layer + n_str * s["sequential_s"] * 1e3 + head_ms,
             "floor_ms_full_depth": n_str * s["bytes"] / hw.link.pcie_bandwidth * 1e3}
        r["extrapolated_tokens_per_s_full_depth"] = 1e3 / r["extrapolated_ms_per_token_full_depth"]
        res["runs"]["stream"] = r
        log(f"stream: {s['overlapped_s'] * 1e3:.1f} ms per streamed layer -> "
            f"{r['extrapolated_ms_per_token_full_depth']:.0f} ms/token at {full.n_layers} layers")
        free_cuda()
        ckpt()

    # hotcold ----------------------------------------------------------------------------------
    def hot_sets(p):
        return [p.hot_indices(l).astype(np.int64) for l in range(cfg.n_layers)], \
               [p.cold_indices(l).astype(np.int64) for l in range(cfg.n_layers)]

    masks: dict[str, tuple] = {}

    def hotcold_run(name, p, f_work, dynamic=False, tokens=None):
        free_cuda()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        rss0 = rss_now_bytes()
        hot, cold = hot_sets(p)
        sel = SampledPredictor(f_work, cfg.dim, rank, dev, tdtype, seed=o.seed + 1)
        eng = engine_for(hot, cold, "predictor", selector=sel)
        dyn = None
        if dynamic:
            from hotcold.runtime.dynamic import DynamicPlacement

            dyn = DynamicPlacement(eng, cm, f_match, every=o.dyn_every, max_swaps=o.dyn_max_swaps,
                                   margin=o.dyn_margin)
        eng.kernel.warm_up(tdtype)
        n = tokens or o.tokens
        r = run_engine(eng, n, o.warm)
        if dyn is not None:
            dyn.flush()
            r["migration"] = dyn.stats.to_json(n + o.warm)
            r["tau_history"] = [h for h in dyn.stats.history if "committed" in h][-8:]
            r["decisions"] = [h for h in dyn.stats.history if "swaps" in h][-8:]
        hm = np.zeros((cfg.n_layers, cfg.n_ff), bool)
        for l in range(cfg.n_layers):
            hm[l][eng.gl[l].hot_ids] = True
        r["predicted"] = predict_ms(cm, f_work, hm)
        r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
        masks[name] = (hm, f_work, "predictor")
        for label, h in o.predict_hw:
            pr = predict_ms(CostModel(cfg, h, dt_name, **cm_args), f_work, hm)
            r[f"predicted_{label}"] = pr
            r[f"model_error_{label}"] = pr["ms_per_token"] / r["ms_per_token"] - 1
        served = float((f_work * hm).sum())
        r["gpu_share"] = served / float(f_work.sum())
        r["gpu_share_measured"] = None
        cold_f = f_work[~hm]
        r["cold_density"] = float(cold_f.mean()) if cold_f.size else 0.0
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
        extrap(r, head_ms)
        res["runs"][name] = r
        log(f"{name}: {r['ms_per_token']:.2f} ms/token (model {r['predicted']['ms_per_token']:.2f}), "
            f"cpu {r['cpu_kernel_ms_per_token']:.2f} ms @ {r['cpu_GBps'] or 0:.0f} GB/s, share {r['gpu_share']:.3f}")
        del eng, sel, dyn
        free_cuda()
        ckpt()

    for pol in ("fixed", "adaptive"):
        if f"hotcold-{pol}" in o.runs:
            hotcold_run(f"hotcold-{pol}", placements[pol], f_match)
            if f_shift is not None:
                hotcold_run(f"hotcold-{pol}@shifted", placements[pol], f_shift)
    if "hotcold-dynamic" in o.runs:
        hotcold_run("hotcold-fixed-long", placements["fixed"], f_match, tokens=o.dyn_tokens)
        hotcold_run("hotcold-dynamic", placements["fixed"], f_match, dynamic=True, tokens=o.dyn_tokens)
        if f_shift is not None:
            hotcold_run("hotcold-fixed@shifted-long", placements["fixed"], f_shift, tokens=o.dyn_tokens)
            hotcold_run("hotcold-dynamic@shifted", placements["fixed"], f_shift, dynamic=True, tokens=o.dyn_tokens)

    if "threshold" in o.runs and "fixed" in placements:
        # real activations of the scaled gate rows: the CPU reads every cold gate row (CATS)
        hot, cold = hot_sets(placements["fixed"])
        eng = engine_for(hot, cold, "threshold", thresholds=[GATE_T] * cfg.n_layers)
        eng.kernel.warm_up(tdtype)
        r = run_engine(eng, max(8, o.tokens // 2), o.warm)
        n_cold = sum(c.n_cold for c in eng.cl)
        r["measured_cold_density"] = r["cold_active_per_token"] / max(n_cold, 1)
        fm = np.minimum(f_match, F_CAP)
        hm = np.zeros((cfg.n_layers, cfg.n_ff), bool)
        for l in range(cfg.n_layers):
            hm[l][eng.gl[l].hot_ids] = True
        r["expected_cold_density"] = float(fm[~hm].mean())
        r["predicted"] = predict_ms(CostModel(cfg, hw, dt_name, cold_mode="threshold", ctx_len=o.max_len), fm, hm)
        r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
        masks["hotcold-fixed-threshold"] = (hm, fm, "threshold")
        extrap(r, head_ms)
        res["runs"]["hotcold-fixed-threshold"] = r
        log(f"threshold: {r['ms_per_token']:.2f} ms/token, cold density measured {r['measured_cold_density']:.3f} "
            f"vs {r['expected_cold_density']:.3f} expected")
        # online t_l: hold a target density (half the measured one) and watch t_l move
        target = max(0.01, 0.5 * r["measured_cold_density"])
        eng.hold_density(target, gain=0.2)
        eng.totals = type(eng.totals)()
        for _ in range(48):
            eng.step(None)
        tail = eng.totals
        dens = [a / max(n_cold, 1) for a in [tail.cold_active]][0] / tail.tokens
        res["runs"]["threshold-hold-density"] = {
            "target_density_all_neurons": target, "cold_side_density_over_run": dens,
            "last_token_density_per_layer": [float(v) for v in getattr(eng, "last_density", [])],
            "t_start": GATE_T, "t_final": [float(v) for v in eng.thr],
            "t_history_every_8": eng.thr_history[::8], "ms_per_token": 1e3 * tail.seconds / tail.tokens}
        log(f"hold density {target:.3f}: t_l -> {np.round(eng.thr, 3).tolist()}")
        del eng
        free_cuda()
        ckpt()

    if "hotcold-fixed" in res["runs"] and "dense-gpu" in res["runs"]:
        fit_hardware(res, hw, cfg, dt_name, o, masks, rank)
        ckpt()
    res["peak_rss_bytes"] = rss_peak_bytes()
    if dev.type == "cuda":
        res["peak_gpu_bytes_process"] = torch.cuda.max_memory_reserved(dev)
    res["summary"] = summarize(res)
    ckpt()
    return res


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
    from hotcold.memory import placement_bytes

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


def fit_hardware(res: dict[str, Any], hw, cfg: ModelConfig, dt_name: str, o: BenchOptions, masks: dict,
                 rank: int) -> None:
    """Fix the cost model's parameters with what this run measured, and predict every run again.

    gpu.bandwidth  = the all-GPU run's achieved weight+KV bytes per second
    cpu.bandwidth  = hotcold-fixed's cold-kernel bytes per second
    per split layer = hotcold-fixed's time not explained by the model with the two above and no sync
                     (exchange, launches, host work around the kernel): link.host_overhead_seconds beyond
                     the measured sync where the HardwareSpec has that field, else link.sync_seconds
    Fitted on hotcold-fixed (and dense-gpu); every other run is an out-of-sample check.
    """
    import dataclasses

    from hotcold.solver.costmodel import CostModel

    R = res["runs"]
    d, f = R["dense-gpu"], R["hotcold-fixed"]
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
                                 source="fitted by hotcold bench (hotcold.bench.harness.fit_hardware)",
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
    """The acceptance ratios (issue 6), from one run."""
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


def save_json(obj: Any, path: str | Path) -> None:
    from hotcold.artifacts import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n")
