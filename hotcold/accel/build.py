"""Build a HybridEngine: from dense weights + a hot set per layer, from a Placement, or from a Bundle.

The split is the Bundle's layout (hotcold.exporter.format): the CPU side takes `cold_gate` [C, D] and
`cold_up_down` [C, 2D] as written (memory-mapped when they come from a Bundle); the GPU side re-packs the
hot rows as hot_gu [k, 2, D] (gate and up row of a slot side by side) so that the dynamic mode can move
one neuron by writing one slot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hotcold.accel.engine import CpuLayer, GpuLayer, HybridEngine
from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource


def split_layer(t: dict[str, torch.Tensor], hot_ids: np.ndarray, n_ff: int, device, dtype: torch.dtype,
                pin: bool = False) -> tuple[GpuLayer, CpuLayer]:
    """One layer's dense tensors (our names, any device) -> its GPU and CPU parts.

    hot_ids: neuron ids on the GPU, in slot order; the others go to the CPU in the order of
    `cold_order(hot_ids)` (ascending id unless `t` carries an explicit "cold_ids").
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
    return gl, CpuLayer(gate=gate, up_down=up_down, cold_ids=cold.numpy().copy())


def from_source(src: WeightSource, hot_ids: Sequence[np.ndarray], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, cold_ids: Sequence[np.ndarray] | None = None,
                **engine_kw: Any) -> HybridEngine:
    """An engine over `src`'s weights with `hot_ids[l]` (slot order) on the GPU side of layer l."""
    cfg = src.config
    device = torch.device(device)
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
    return HybridEngine(cfg, embed, src.get("norm", dtype).to(device), head, gls, cls, **engine_kw)


def from_placement(src: WeightSource, placement, **kw: Any) -> HybridEngine:
    """hot = placement.hot_indices(l) (hottest first), cold in the placement's order (hottest first)."""
    L = src.config.n_layers
    return from_source(src, [placement.hot_indices(l) for l in range(L)],
                       cold_ids=[placement.cold_indices(l) for l in range(L)], **kw)


def from_bundle(path: str | Path, *, device: str | torch.device = "cpu", **engine_kw: Any) -> HybridEngine:
    """An engine over an exported Bundle (hotcold.exporter.format): GPU part moved to `device`, CPU part
    memory-mapped. The manifest is read and the files' hashes checked first."""
    from hotcold.artifacts import read_manifest, verify_files
    from hotcold.exporter.format import CPU_FILE, FORMAT_VERSION, GPU_FILE, KIND, NEURONS_FILE, mmap_tensors

    path = Path(path)
    manifest = read_manifest(path, KIND, (FORMAT_VERSION,))
    verify_files(path, manifest, KIND)
    cfg = ModelConfig.from_json(manifest["model"]["config"])
    device = torch.device(device)
    gt, ct, nt = mmap_tensors(path / GPU_FILE), mmap_tensors(path / CPU_FILE), mmap_tensors(path / NEURONS_FILE)
    gls, cls = [], []
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        hg, k = gt[p + "hot_gate_up"], int(nt[p + "hot"].numel())
        gls.append(GpuLayer(
            attn_norm=gt[p + "attn_norm"].to(device), ffn_norm=gt[p + "ffn_norm"].to(device),
            wqkv=gt[p + "wqkv"].to(device), wo=gt[p + "wo"].to(device),
            bqkv=gt[p + "bqkv"].to(device) if p + "bqkv" in gt else None,
            hot_gu=torch.stack([hg[:k], hg[k:]], dim=1).to(device).contiguous(),
            hot_down=gt[p + "hot_down"].to(device).contiguous(), hot_ids=nt[p + "hot"].numpy().astype(np.int64)))
        if p + "cold_gate" in ct:  # the `bundled` CPU layout: used as written (memory-mapped)
            gate, up_down = ct[p + "cold_gate"], ct[p + "cold_up_down"]
        else:  # the `split` layout: re-bundled in memory
            c = int(nt[p + "cold"].numel())
            gu = ct[p + "cold_gate_up_t"].t()  # stored [D, 2c] (gemv layout); rows 0..c-1 gate, c..2c-1 up
            gate, up_down = gu[:c].contiguous(), torch.cat([gu[c:], ct[p + "cold_down"]], dim=1)
        cls.append(CpuLayer(gate=gate, up_down=up_down, cold_ids=nt[p + "cold"].numpy().astype(np.int64)))
    embed = gt["tok_embeddings"].to(device)
    head = embed if cfg.tie_embeddings else gt["output"].to(device)
    act = manifest.get("activation") or {}
    if "thresholds" not in engine_kw and act.get("thresholds") and act.get("rule", "gate") == "gate":
        engine_kw["thresholds"] = [float(v) for v in act["thresholds"]]
    return HybridEngine(cfg, embed, gt["norm"].to(device), head, gls, cls, **engine_kw)
