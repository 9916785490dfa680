"""Build the HybridModel: from a Bundle (what users run), or from dense weights + a hot set per layer, or
a Placement (the benchmark and the tests, where weights are generated rather than exported).

From a Bundle, everything goes through `hotcold.bundle.Bundle.load`, the one reader (manifest hash,
every file's sha256, tensor shapes and dtypes, the byte account, the model fingerprint); the CPU side
takes the cold rows in the layout the Bundle was written in; the GPU side re-packs the hot rows as
hot_gu [k, 2, D] (gate and up row of a slot side by side) so that dynamic mode can move one neuron by
writing one slot.

Quantized weights (hotcold.quant; docs/quantized.md "Runtime API"): a quantized Bundle is built the same
way (its matrices arrive as QTensors; hot_gu becomes the [2k, D] QTensor whose rows 2s, 2s + 1 are slot
s's gate and up rows). Without a Bundle: `from_source(src, hot_ids, quant="q4")` quantizes a float
source's weights as the exporter does, `quantized_gpu_layer` / `quantized_cpu_layer` assemble layers from
QTensors a caller made (e.g. `quant.random_qtensor` on the GPU), and `random_quantized_model` builds a
whole model of random quantized bytes generated on the device (the benchmark's 70B shape at 4 bits).
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
from hotcold.devices import resolve_device, torch_dtypes  # noqa: F401 - resolve_device: re-exported (bench, cli)
from hotcold.quant import QFormat, QTensor, hcat, parse_format, quantize, random_qtensor
from hotcold.runtime.model import CpuLayer, GpuLayer, HybridModel, weight_bytes

CHUNK = 4096  # rows a random model generates at a time on its device (cold rows, the embedding)

TORCH_DTYPES = torch_dtypes()


def fits_in_memory(nbytes: int, share: float = 0.5) -> bool:
    """Whether `nbytes` is at most `share` of the memory available now (Linux MemAvailable; False where
    it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return nbytes <= share * avail


def interleave_gate_up(gate: QTensor, up: QTensor) -> QTensor:
    """Hot gate rows [k, D] and up rows [k, D] -> the [2k, D] QTensor whose rows 2s, 2s + 1 are slot s's gate
    and up rows (GpuLayer.hot_gu of a quantized layer; a row gather, the values unchanged)."""
    if gate.fmt != up.fmt or gate.shape != up.shape:
        raise InputError(f"hot gate {gate.fmt.name} {list(gate.shape)} and up {up.fmt.name} {list(up.shape)} "
                         "rows differ", "quantize both in one format and shape")
    k = gate.shape[0]
    both = QTensor(torch.cat([gate.packed, up.packed]), gate.fmt, (2 * k, gate.shape[1]))
    order = torch.stack([torch.arange(k), torch.arange(k) + k], dim=1).reshape(-1)
    return both.take_rows(order.to(gate.device))


def quantized_gpu_layer(attn_norm: torch.Tensor, wqkv: QTensor, wo: QTensor, ffn_norm: torch.Tensor,
                        hot_gate: QTensor, hot_up: QTensor, hot_down: QTensor, hot_ids: np.ndarray,
                        bqkv: torch.Tensor | None = None) -> GpuLayer:
    """A quantized layer's GPU side from QTensors on the GPU device: wqkv [(H + 2 KV) Hd, D], wo [D, H Hd],
    hot_gate / hot_up / hot_down [k, D] (hot_down row s: slot s's down column), norms float32 [D]."""
    return GpuLayer(attn_norm=attn_norm, wqkv=wqkv, wo=wo, ffn_norm=ffn_norm, bqkv=bqkv,
                    hot_gu=interleave_gate_up(hot_gate, hot_up), hot_down=hot_down,
                    hot_ids=np.asarray(hot_ids, dtype=np.int64))


def quantized_cpu_layer(cold_gate: QTensor, cold_up: QTensor, cold_down: QTensor, cold_ids: np.ndarray,
                        pin: bool = False) -> CpuLayer:
    """A quantized layer's CPU side (bundled layout) from QTensors [C, D] (cold_down row j: slot j's down
    column), moved to host memory (pinned when `pin`): gate [C, D] and up_down = hcat(up, down) [C, 2D]."""
    gate, ud = cold_gate.to("cpu").contiguous(), hcat(cold_up.to("cpu"), cold_down.to("cpu"))
    if pin:
        gate, ud = QTensor(gate.packed.pin_memory(), gate.fmt, gate.shape), QTensor(ud.packed.pin_memory(), ud.fmt, ud.shape)
    return CpuLayer(cold_ids=np.asarray(cold_ids, dtype=np.int64), gate=gate, up_down=ud)


def _quant(quant: str | QFormat | None) -> QFormat | None:
    if quant is None or isinstance(quant, QFormat):
        return quant
    fmt = parse_format(quant)
    if fmt is None:
        raise InputError(f"{quant!r} is not a quantized format", "pass q4, q8, q4a, q8a (optionally _g64 ...) or None")
    return fmt


def split_layer(t: dict[str, torch.Tensor], hot_ids: np.ndarray, n_ff: int, device, dtype: torch.dtype,
                pin: bool = False, quant: str | QFormat | None = None) -> tuple[GpuLayer, CpuLayer]:
    """One layer's dense tensors (our names, any device) -> its GPU part and its CPU part (bundled layout).

    hot_ids: neuron ids on the GPU, in slot order; the others go to the CPU in ascending id order unless
    `t` carries an explicit "cold_ids". quant: quantize every matrix into this format (hotcold.quant, as
    the exporter does: down columns by neuron, norms and biases float32); `dtype` is then unused.
    """
    fmt = _quant(quant)
    if fmt is not None:
        return _split_layer_quantized(t, hot_ids, n_ff, device, fmt, pin)
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


def _cold_ids(hot_ids: np.ndarray, n_ff: int, t: dict[str, Any]) -> np.ndarray:
    cold_np = t.get("cold_ids")
    if cold_np is None:
        mask = np.ones(n_ff, dtype=bool)
        mask[np.asarray(hot_ids, dtype=np.int64)] = False
        cold_np = np.flatnonzero(mask)
    return np.asarray(cold_np, dtype=np.int64)


def _split_layer_quantized(t: dict[str, torch.Tensor], hot_ids: np.ndarray, n_ff: int, device, fmt: QFormat,
                           pin: bool) -> tuple[GpuLayer, CpuLayer]:
    hot = np.asarray(hot_ids, dtype=np.int64)
    cold = _cold_ids(hot, n_ff, t)

    def q(w: torch.Tensor, name: str) -> QTensor:
        return quantize(w.float().contiguous(), fmt.bits, fmt.group, fmt.asym, name=name)

    gate, up, down_t = q(t["w_gate"], "w_gate"), q(t["w_up"], "w_up"), q(t["w_down"].t(), "w_down")  # [F, D] each
    f32 = torch.float32
    gl = quantized_gpu_layer(
        attn_norm=t["attn_norm"].to(device, f32), ffn_norm=t["ffn_norm"].to(device, f32),
        wqkv=q(torch.cat([t["wq"], t["wk"], t["wv"]]), "wqkv").to(device), wo=q(t["wo"], "wo").to(device),
        bqkv=(torch.cat([t["bq"], t["bk"], t["bv"]]).to(device, f32) if "bq" in t else None),
        hot_gate=gate.take_rows(hot).to(device), hot_up=up.take_rows(hot).to(device),
        hot_down=down_t.take_rows(hot).to(device), hot_ids=hot)
    return gl, quantized_cpu_layer(gate.take_rows(cold), up.take_rows(cold), down_t.take_rows(cold), cold, pin)


def from_source(src: WeightSource, hot_ids: Sequence[np.ndarray], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, cold_ids: Sequence[np.ndarray] | None = None,
                quant: str | QFormat | None = None, **model_kw: Any) -> HybridModel:
    """A model over `src`'s weights with `hot_ids[l]` (slot order) on the GPU side of layer l.

    quant: quantize the weights into this hotcold.quant format (q4, q8, q4a, ...) as the exporter does
    (embedding float16, norms float32, every other matrix quantized; `dtype` is then unused)."""
    cfg = src.config
    device = resolve_device(device)
    fmt = _quant(quant)
    gls, cls = [], []
    for l in range(cfg.n_layers):
        t = src.layer(l, torch.float32)
        if cold_ids is not None:
            t["cold_ids"] = cold_ids[l]
        g, c = split_layer(t, hot_ids[l], cfg.n_ff, device, dtype, quant=fmt)
        gls.append(g)
        cls.append(c)
    if fmt is not None:
        embed = src.embedding(torch.float16).to(device)
        head = embed if cfg.tie_embeddings else quantize(src.lm_head(torch.float32), fmt.bits, fmt.group, fmt.asym,
                                                         name="output").to(device)
        return HybridModel(cfg, embed, src.get("norm", torch.float32).to(device), head, gls, cls, **model_kw)
    embed = src.embedding(dtype).to(device)
    head = embed if cfg.tie_embeddings else src.lm_head(dtype).to(device)
    return HybridModel(cfg, embed, src.get("norm", dtype).to(device), head, gls, cls, **model_kw)


def random_quantized_model(cfg: ModelConfig, n_hot: Sequence[int], quant: str | QFormat = "q4", *,
                           device: str | torch.device = "auto", std: float = 0.02, seed: int = 0,
                           max_len: int | None = None, pin: bool | None = None, **model_kw: Any) -> HybridModel:
    """A model of random quantized bytes (hotcold.quant.random_qtensor), made where each part lives: the GPU
    side on `device` (no float copy, no host round trip), the cold rows generated on `device` one layer at a
    time and copied to host memory (pinned on CUDA unless pin=False). Layer l keeps neurons 0..n_hot[l]-1
    hot. Norms are ones (float32), the embedding float16 random, the head quantized unless tied. Attaches
    the memory account (hotcold.memory.placement_bytes of this format at max_len) as `model.account`."""
    from hotcold.memory import placement_bytes

    fmt = _quant(quant)
    dev = resolve_device(device)
    pin = dev.type == "cuda" if pin is None else pin
    max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    D, F_, L = cfg.dim, cfg.n_ff, cfg.n_layers
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if len(n_hot) != L or any(k < 0 or k > F_ for k in n_hot):
        raise InputError(f"n_hot must have {L} entries in [0, {F_}]", "pass one hot-neuron count per layer")
    seeds = iter(range(seed * 1000003, seed * 1000003 + 10 * L + 10))

    def rq(rows: int, cols: int, seed_: int | None = None) -> QTensor:
        return random_qtensor(rows, cols, fmt, std=std, device=dev, seed=next(seeds) if seed_ is None else seed_)

    def cold_layer(c: int, k: int) -> CpuLayer:
        # generated CHUNK rows at a time into the host buffers, so that the GPU never holds more than a
        # chunk of them: the peak GPU memory of a build is what the model keeps
        s_g, s_u, s_d = next(seeds), next(seeds), next(seeds)
        ids = np.arange(k, F_, dtype=np.int64)
        if c <= CHUNK:
            return quantized_cpu_layer(*(random_qtensor(c, D, fmt, std=std, device=dev, seed=s)
                                         for s in (s_g, s_u, s_d)), ids, pin)
        gate = torch.empty(c, fmt.row_bytes(D), dtype=torch.uint8, pin_memory=pin)
        ud = torch.empty(c, fmt.row_bytes(2 * D), dtype=torch.uint8, pin_memory=pin)
        for i, r0 in enumerate(range(0, c, CHUNK)):
            n = min(CHUNK, c - r0)
            part = [random_qtensor(n, D, fmt, std=std, device=dev, seed=s * 7919 + i) for s in (s_g, s_u, s_d)]
            gate[r0:r0 + n].copy_(part[0].packed)
            ud[r0:r0 + n].copy_(hcat(part[1], part[2]).packed)
        return CpuLayer(cold_ids=ids, gate=QTensor(gate, fmt, (c, D)), up_down=QTensor(ud, fmt, (c, 2 * D)))

    # the embedding and the cold rows first: their float and chunk temporaries are the build's only ones, so
    # once they are gone every GPU tensor made after them is packed back to back (no holes between layers)
    g = torch.Generator(device=dev).manual_seed(seed)
    if cfg.vocab_size <= CHUNK:
        embed = (torch.randn(cfg.vocab_size, D, generator=g, device=dev) * std).to(torch.float16)
    else:  # float16 chunk by chunk: no float32 copy of the whole table on the GPU
        embed = torch.empty(cfg.vocab_size, D, dtype=torch.float16, device=dev)
        for r0 in range(0, cfg.vocab_size, CHUNK):
            embed[r0:r0 + CHUNK].copy_(torch.randn(min(CHUNK, cfg.vocab_size - r0), D, generator=g, device=dev) * std)
    layer_seeds = [[next(seeds) for _ in range(4)] for _ in range(L)]
    cls = [cold_layer(F_ - int(n_hot[l]), int(n_hot[l])) for l in range(L)]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    gls = []
    for l in range(L):
        k, (s_qkv, s_o, s_gu, s_d) = int(n_hot[l]), layer_seeds[l]
        ones = torch.ones(D, dtype=torch.float32, device=dev)
        gls.append(GpuLayer(attn_norm=ones, ffn_norm=ones.clone(), wqkv=rq(q + 2 * kv, D, s_qkv), wo=rq(D, q, s_o),
                            bqkv=torch.zeros(q + 2 * kv, dtype=torch.float32, device=dev) if cfg.qkv_bias else None,
                            hot_gu=rq(2 * k, D, s_gu), hot_down=rq(k, D, s_d), hot_ids=np.arange(k, dtype=np.int64)))
    head = embed if cfg.tie_embeddings else rq(cfg.vocab_size, D)
    account = placement_bytes(cfg, list(n_hot), fmt.name, ctx_len=max_len)
    return HybridModel(cfg, embed, torch.ones(D, dtype=torch.float32, device=dev), head, gls, cls, max_len=max_len,
                       account=account, **model_kw)


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
                         "re-export with --profile and --sparsity (or --threshold), pass --threshold, or use --cold-mode exact")
    cpu_bytes = sum(weight_bytes(t) for t in bundle.cpu.values())
    resident = fits_in_memory(cpu_bytes) if resident is None else resident
    pin = dev.type == "cuda" and resident and os.environ.get("HOTCOLD_NO_PIN", "") in ("", "0")

    def cpu(name: str) -> torch.Tensor | QTensor:
        t = bundle.cpu[name]
        if not resident:
            return t  # pages read from the bundle on demand (copy-on-write mapping)
        if isinstance(t, QTensor):
            return QTensor(t.packed.pin_memory() if pin else t.packed.clone(), t.fmt, t.shape)
        return t.pin_memory() if pin else t.clone()

    g, nt = bundle.gpu, bundle.neurons
    gls, cls = [], []
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        hg, k = g[p + "hot_gate_up"], int(nt[p + "hot"].numel())
        if isinstance(hg, QTensor):  # rows 0..k-1 gate, k..2k-1 up -> slot s's gate and up at rows 2s, 2s + 1
            hot_gu = interleave_gate_up(hg.rows(0, k), hg.rows(k, 2 * k)).to(dev)
        else:
            hot_gu = torch.stack([hg[:k], hg[k:]], dim=1).to(dev).contiguous()
        gls.append(GpuLayer(
            attn_norm=g[p + "attn_norm"].to(dev), ffn_norm=g[p + "ffn_norm"].to(dev),
            wqkv=g[p + "wqkv"].to(dev), wo=g[p + "wo"].to(dev),
            bqkv=g[p + "bqkv"].to(dev) if p + "bqkv" in g else None,
            hot_gu=hot_gu, hot_down=g[p + "hot_down"].to(dev).contiguous(),
            hot_ids=nt[p + "hot"].numpy().astype(np.int64)))
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
