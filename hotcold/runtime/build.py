"""Build the HybridModel: from a Bundle (what users run), or from dense weights + a hot set per layer, or
a Placement (the benchmark and the tests, where weights are generated rather than exported).

From a Bundle, everything goes through `hotcold.bundle.Bundle.load`, the one reader (manifest hash,
every file's sha256, tensor shapes and dtypes, the byte account, the model fingerprint); the CPU side
takes the cold rows in the layout the Bundle was written in; the GPU side re-packs the hot rows as
hot_gu [k, 2, D] (gate and up row of a slot side by side) so that dynamic mode can move one neuron by
writing one slot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource
from hotcold.runtime.model import CpuLayer, GpuLayer, HybridModel

DEVICES = ("auto", "cuda", "cpu")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """auto -> cuda when present, else cpu; a clear error for cuda without a GPU or an unknown name."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", "use --device auto or cpu")
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}", f"use one of: {', '.join(DEVICES)}")
    return torch.device(device)


def fits_in_memory(nbytes: int, share: float = 0.5) -> bool:
    """Whether `nbytes` is at most `share` of the memory available now (Linux MemAvailable; False where
    it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return nbytes <= share * avail


def split_layer(t: dict[str, torch.Tensor], hot_ids: np.ndarray, n_ff: int, device, dtype: torch.dtype,
                pin: bool = False) -> tuple[GpuLayer, CpuLayer]:
    """One layer's dense tensors (our names, any device) -> its GPU part and its CPU part (bundled layout).

    hot_ids: neuron ids on the GPU, in slot order; the others go to the CPU in ascending id order unless
    `t` carries an explicit "cold_ids".
    """
    hot = torch.as_tensor(np.asarray(hot_ids, dtype=np.int64))
    cold_np = t.get("cold_ids")
    if cold_np is None:
        mask = np.ones(n_ff, dtype=bool)
        mask[np.asarray(hot_ids, dtype=np.int64)] = False
        cold_np = np.flatnonzero(mask)
    cold = torch.as_tensor(np.asarray(cold_np, dtype=np.int64))
    src_dev = t["w_gate"].device
    hot_d, cold_d = hot.to(src_dev), cold.to(src_dev)
    wg, wu, wd = t["w_gate"], t["w_up"], t["w_down"]
    hot_gu = torch.stack([wg.index_select(0, hot_d), wu.index_select(0, hot_d)], dim=1)
    hot_down = wd.index_select(1, hot_d).t()
    gl = GpuLayer(
        attn_norm=t["attn_norm"].to(device, dtype), ffn_norm=t["ffn_norm"].to(device, dtype),
        wqkv=torch.cat([t["wq"], t["wk"], t["wv"]]).to(device, dtype), wo=t["wo"].to(device, dtype),
        bqkv=(torch.cat([t["bq"], t["bk"], t["bv"]]).to(device, dtype) if "bq" in t else None),
        hot_gu=hot_gu.to(device, dtype).contiguous(), hot_down=hot_down.to(device, dtype).contiguous(),
        hot_ids=hot.numpy().copy())
    gate = wg.index_select(0, cold_d).to("cpu", dtype).contiguous()
    up_down = torch.cat([wu.index_select(0, cold_d), wd.index_select(1, cold_d).t()], dim=1).to("cpu", dtype).contiguous()
    if pin:
        gate, up_down = gate.pin_memory(), up_down.pin_memory()
    return gl, CpuLayer(cold_ids=cold.numpy().copy(), gate=gate, up_down=up_down)


def from_source(src: WeightSource, hot_ids: Sequence[np.ndarray], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, cold_ids: Sequence[np.ndarray] | None = None,
                **model_kw: Any) -> HybridModel:
    """A model over `src`'s weights with `hot_ids[l]` (slot order) on the GPU side of layer l."""
    cfg = src.config
    device = resolve_device(device)
    gls, cls = [], []
    for l in range(cfg.n_layers):
        t = src.layer(l, torch.float32)
        if cold_ids is not None:
            t["cold_ids"] = cold_ids[l]
        g, c = split_layer(t, hot_ids[l], cfg.n_ff, device, dtype)
        gls.append(g)
        cls.append(c)
    embed = src.embedding(dtype).to(device)
    head = embed if cfg.tie_embeddings else src.lm_head(dtype).to(device)
    return HybridModel(cfg, embed, src.get("norm", dtype).to(device), head, gls, cls, **model_kw)


def from_placement(src: WeightSource, placement, **kw: Any) -> HybridModel:
    """hot = placement.hot_indices(l) (hottest first), cold in the placement's order (hottest first)."""
    L = src.config.n_layers
    return from_source(src, [placement.hot_indices(l) for l in range(L)],
                       cold_ids=[placement.cold_indices(l) for l in range(L)], **kw)


def from_bundle(bundle: Any, *, mode: str = "threshold", device: str | torch.device = "auto",
                gpu_budget: int | str | None = None, max_len: int | None = None,
                thresholds: float | Sequence[float] | None = None, resident: bool | None = None,
                predictor_backend: str = "torch", **model_kw: Any) -> HybridModel:
    """A model over a Bundle (a loaded hotcold.bundle.Bundle, or its path): GPU part on `device`, CPU part as
    written.

    gpu_budget: refuse (InfeasibleError, one line) when the bundle's GPU part with a `max_len` KV cache
    exceeds it. resident: copy the CPU part from the bundle's memory map into process memory (faster to
    stream; None = when it fits in half of the available memory). thresholds: one t_l for every layer or
    one per layer instead of the bundle's.
    """
    if isinstance(bundle, (str, Path)):
        from hotcold.bundle import Bundle

        bundle = Bundle.load(bundle)
    cfg: ModelConfig = bundle.config
    dev = resolve_device(device)
    max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    account = bundle.check_budget(gpu_budget, max_len, mode)
    if thresholds is not None:
        from hotcold.bundle import given_thresholds

        ts: list[float] | None = given_thresholds(thresholds, cfg.n_layers)
    else:
        ts = bundle.thresholds
    if mode != "exact" and mode != "predictor" and ts is None:
        raise InputError(f"bundle {bundle.path} has no activation thresholds, which --mode {mode} needs",
                         "re-export with --profile and --sparsity (or --threshold), pass --threshold, or use --mode exact")
    dtype = TORCH_DTYPES[bundle.dtype]
    cpu_bytes = sum(t.numel() * t.element_size() for t in bundle.cpu.values())
    resident = fits_in_memory(cpu_bytes) if resident is None else resident
    pin = dev.type == "cuda" and resident and os.environ.get("HOTCOLD_NO_PIN", "") in ("", "0")

    def cpu(name: str) -> torch.Tensor:
        t = bundle.cpu[name]
        if not resident:
            return t  # pages read from the bundle on demand (copy-on-write mapping)
        return t.pin_memory() if pin else t.clone()

    g, nt = bundle.gpu, bundle.neurons
    gls, cls = [], []
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        hg, k = g[p + "hot_gate_up"], int(nt[p + "hot"].numel())
        gls.append(GpuLayer(
            attn_norm=g[p + "attn_norm"].to(dev), ffn_norm=g[p + "ffn_norm"].to(dev),
            wqkv=g[p + "wqkv"].to(dev), wo=g[p + "wo"].to(dev),
            bqkv=g[p + "bqkv"].to(dev) if p + "bqkv" in g else None,
            hot_gu=torch.stack([hg[:k], hg[k:]], dim=1).to(dev).contiguous(),
            hot_down=g[p + "hot_down"].to(dev).contiguous(), hot_ids=nt[p + "hot"].numpy().astype(np.int64)))
        cold = nt[p + "cold"].numpy().astype(np.int64)
        if bundle.cpu_layout == "bundled":
            cls.append(CpuLayer(cold_ids=cold, gate=cpu(p + "cold_gate"), up_down=cpu(p + "cold_up_down")))
        else:
            cls.append(CpuLayer(cold_ids=cold, gate_up_t=cpu(p + "cold_gate_up_t"), down=cpu(p + "cold_down")))
    embed = g["tok_embeddings"].to(dev)
    head = embed if cfg.tie_embeddings else g["output"].to(dev)
    selector = None
    if mode == "predictor":
        from hotcold.runtime.predictor import BundlePredictors

        selector = BundlePredictors(bundle, dev, predictor_backend)
        if predictor_backend != "torch":
            model_kw["graphs"] = False  # onnxruntime runs outside the GPU stream: nothing to capture
    return HybridModel(cfg, embed, g["norm"].to(dev), head, gls, cls, cold_mode=mode, rule=bundle.rule or "product",
                       max_len=max_len, thresholds=ts, selector=selector, bundle=bundle, account=account,
                       **model_kw)


def load(path: str | Path, mode: str = "threshold", device: str = "auto", gpu_budget: int | str | None = None,
         verify: str = "full", expect_fingerprint: str | None = None, **kw: Any) -> HybridModel:
    """Load and verify a Bundle and build the model on it (see from_bundle and HybridModel for options)."""
    from hotcold.bundle import Bundle

    b = Bundle.load(path, verify=verify, expect_fingerprint=expect_fingerprint)
    return from_bundle(b, mode=mode, device=device, gpu_budget=gpu_budget, **kw)
