"""The baselines a user would pick instead of hotcold, at the same GPU budget:

  dense-gpu     every neuron hot: the all-on-GPU dense model (when it fits), also "budget ≥ model"
  layer-split   llama.cpp -ngl style: k whole layers on the GPU, the rest computed on the CPU. Measured
                per layer (a GPU layer, a CPU layer with the dense reference model's fp16 F.linear path)
                and composed: k·T_gpu + (N − k)·T_cpu + head
  stream        accelerate style: non-resident layers copied over PCIe every token. Measured per
                streamed layer both overlapped (prefetch on a side stream: the best case) and sequential
                (copy, then compute: what accelerate's hooks do), then composed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hotcold.bench.fits import predict_ms
from hotcold.bench.runs import _median_time, free_cuda, gpu_memory_start, run_engine
from hotcold.bench.weights import build_model, nonlayer_bytes
from hotcold.memory import dense_bytes
from hotcold.model.config import ModelConfig

if TYPE_CHECKING:
    from hotcold.bench.harness import BenchContext


# ---- per-layer measurements --------------------------------------------------------------------
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


# ---- the runs ----------------------------------------------------------------------------------
def dense_gpu_run(ctx: BenchContext) -> dict:
    """Every neuron hot, exact mode: timed against the all-GPU bandwidth floor. Measures the LM head too:
    ctx.head_ms becomes the measured head time that every later extrapolation adds."""
    cfg, o, dev, hw = ctx.cfg, ctx.o, ctx.dev, ctx.hw
    all_ids = [np.arange(cfg.n_ff)] * cfg.n_layers
    none_ids = [np.zeros(0, dtype=np.int64)] * cfg.n_layers
    base = gpu_memory_start(dev)
    eng = build_model(ctx, all_ids, none_ids, "exact")
    r = run_engine(eng, o.tokens, o.warm)
    r["segments_per_token"] = eng.n_segments
    head_s = _median_time(lambda: torch.nn.functional.linear(ctx.glob["norm"], ctx.glob["output"]), 20, dev)
    ctx.head_ms = head_s * 1e3
    r["head_ms_measured"] = ctx.head_ms
    floor_bytes = eng.gpu_bytes_per_token()
    r["floor_ms"] = floor_bytes / hw.gpu.bandwidth * 1e3
    r["ratio_to_floor"] = r["ms_per_token"] / r["floor_ms"]
    if o.floor_hw is not None:
        r["floor_ms_machine"] = floor_bytes / o.floor_hw.gpu.bandwidth * 1e3
        r["ratio_to_floor_machine"] = r["ms_per_token"] / r["floor_ms_machine"]
    r["memory"] = eng.memory()
    if dev.type == "cuda":
        r["peak_gpu_bytes_run"] = torch.cuda.max_memory_allocated(dev) - base
    all_hot = np.ones((cfg.n_layers, cfg.n_ff), bool)
    r["predicted"] = predict_ms(ctx.cm_exact, ctx.f_match, all_hot)
    r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
    for label, h in o.predict_hw:
        pr = predict_ms(ctx.cost_model(h, "exact"), ctx.f_match, all_hot)
        r[f"predicted_{label}"] = pr
        r[f"model_error_{label}"] = pr["ms_per_token"] / r["ms_per_token"] - 1
    r["gpu_share"] = 1.0
    ctx.extrapolate(r)
    ctx.res["runs"]["dense-gpu"] = r
    ctx.log(f"dense-gpu: {r['ms_per_token']:.2f} ms/token, floor {r['floor_ms']:.2f} ({r['ratio_to_floor']:.2f}x)")
    del eng
    free_cuda()
    ctx.checkpoint()
    return r


def whole_layers(ctx: BenchContext) -> tuple[int, int]:
    """(bytes of one dense layer, layers of the full-depth model that fit the GPU budget whole with
    their KV cache): the budget as layer split and streaming use it."""
    cfg, o, bits = ctx.cfg, ctx.o, torch.finfo(ctx.dtype).bits
    layer_bytes = dense_bytes(cfg, ctx.dt_name).per_layer + 3 * cfg.n_ff * cfg.dim * bits // 8
    kv_layer = 2 * o.max_len * cfg.n_kv_heads * cfg.head_dim * bits // 8
    k_full = int((o.gpu_budget_full - nonlayer_bytes(cfg, ctx.dt_name)) // (layer_bytes + kv_layer))
    return layer_bytes, max(0, min(ctx.full.n_layers, k_full))


def layer_split_run(ctx: BenchContext, t_gpu_layer: float) -> dict:
    """k whole layers on the GPU (t_gpu_layer ms each, from dense-gpu), the rest dense on the CPU."""
    full, hw = ctx.full, ctx.hw
    layer_bytes, k_full = whole_layers(ctx)
    t_cpu = cpu_layer_seconds(ctx.cfg, ctx.layers[0], ctx.dtype, max_len=ctx.o.max_len) * 1e3
    n_cpu = full.n_layers - k_full
    r = {"method": "composed from measured per-layer times: k GPU layers + (L - k) CPU layers + head",
         "gpu_layers_full_depth": k_full, "cpu_layers_full_depth": n_cpu,
         "gpu_layer_ms": t_gpu_layer, "cpu_layer_ms": t_cpu,
         "cpu_layer_GBps": layer_bytes / (t_cpu * 1e-3) / 1e9,
         "extrapolated_ms_per_token_full_depth": k_full * t_gpu_layer + n_cpu * t_cpu + ctx.head_ms,
         "floor_ms_full_depth": (k_full * layer_bytes / hw.gpu.bandwidth + n_cpu * layer_bytes / hw.cpu.bandwidth) * 1e3}
    r["extrapolated_tokens_per_s_full_depth"] = 1e3 / r["extrapolated_ms_per_token_full_depth"]
    ctx.res["runs"]["layer-split"] = r
    ctx.log(f"layer-split: GPU layer {t_gpu_layer:.3f} ms, CPU layer {t_cpu:.2f} ms -> "
            f"{r['extrapolated_ms_per_token_full_depth']:.0f} ms/token at {full.n_layers} layers")
    ctx.checkpoint()
    return r


def stream_run(ctx: BenchContext, t_gpu_layer: float) -> dict:
    """k whole layers resident on the GPU (t_gpu_layer ms each), the rest streamed over PCIe (CUDA only)."""
    full = ctx.full
    _, k_full = whole_layers(ctx)
    s = stream_layer_seconds(ctx.cfg, ctx.layers[0], ctx.dtype, ctx.dev)
    n_str = full.n_layers - k_full
    r = {"method": "composed from measured per-layer times: k resident layers + (L - k) streamed layers + head",
         "resident_layers_full_depth": k_full, "streamed_layers_full_depth": n_str,
         "streamed_layer_ms_overlapped": s["overlapped_s"] * 1e3, "streamed_layer_ms_sequential": s["sequential_s"] * 1e3,
         "streamed_layer_compute_ms": s["compute_s"] * 1e3, "pcie_GBps_effective": s["pcie_GBps_effective"],
         "extrapolated_ms_per_token_full_depth": k_full * t_gpu_layer + n_str * s["overlapped_s"] * 1e3 + ctx.head_ms,
         "extrapolated_ms_per_token_full_depth_sequential": k_full * t_gpu_layer + n_str * s["sequential_s"] * 1e3 + ctx.head_ms,
         "floor_ms_full_depth": n_str * s["bytes"] / ctx.hw.link.pcie_bandwidth * 1e3}
    r["extrapolated_tokens_per_s_full_depth"] = 1e3 / r["extrapolated_ms_per_token_full_depth"]
    ctx.res["runs"]["stream"] = r
    ctx.log(f"stream: {s['overlapped_s'] * 1e3:.1f} ms per streamed layer -> "
            f"{r['extrapolated_ms_per_token_full_depth']:.0f} ms/token at {full.n_layers} layers")
    free_cuda()
    ctx.checkpoint()
    return r
