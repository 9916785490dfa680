"""The cost model (design.md §4): modelled per-token decode latency at batch 1 of a placement.

Decode at batch 1 is memory-bound, so a device's time is the bytes it reads over its bandwidth. Per layer:

    T_pre   = (attention weights + norms + K/V of ctx_len tokens [+ the predictor]) / BW_gpu
    T_gpu   = Σ_{i hot} g_i                    g_i = B_n / BW_gpu          (hot rows computed densely)
                                              g_i = p_i·B_n / BW_gpu,sparse (`gpu_sparse`: a predictor
                                                                            lets the GPU skip rows)
    T_cpu   = Σ_{i cold} c_i                   threshold: c_i = (B_gate + p_i·(B_up + B_down)) / BW_cpu
                                              predictor: c_i = p_i·B_n / BW_cpu
                                              exact:     c_i = B_n / BW_cpu
    T_l     = T_pre + max(T_gpu, T_cpu) + (T_sync + T_host)·[layer has a cold neuron]

The FFN's input is the attention's output, so the CPU cannot start a layer's cold neurons before the GPU
has finished its attention: the two sides overlap on the FFN only (design.md writes the attention bytes
inside T_gpu; at batch 1 the data dependency puts them before the split). A layer with any cold neuron
pays one exchange (FFN input to the CPU, partial sum back, synchronise: T_sync = link.sync_seconds) and
the engine's host work around it (launches, waiting for the attention, the CPU kernel's parallel-region
start: T_host = link.host_overhead_seconds, 0 unless fitted to an engine). Only T_sync enters C_l
(`ProfileCosts.min_hot`): T_host is paid by every layer with CPU work however many of its neurons are
hot, so no number of hot neurons pays it back; only a whole layer on the GPU avoids it, and the
adaptive MILP prices that choice exactly. Without a discrete GPU
(`link.shared_memory`) both sides read over the same memory bus: T_l = T_pre + T_gpu + T_cpu.
Per-token latency = Σ_l T_l + T_head (final norm, LM head and one embedding row, on the GPU).

p_i is the neuron's activation frequency in the profile (decode phase). B_* come from hotcold.memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hotcold.errors import InputError
from hotcold.memory import (
    COLD_MODES, canonical_dtype, default_kv_dtype, default_predictor_rank, dense_bytes, kv_cache_bytes_per_layer,
    neuron_bytes, predictor_bytes, row_bytes,
)
from hotcold.model.config import ModelConfig
from hotcold.solver.hardware import HardwareSpec


@dataclass(frozen=True)
class CostModel:
    cfg: ModelConfig
    hw: HardwareSpec
    dtype: str
    cold_mode: str = "threshold"
    ctx_len: int = 2048
    predictor_rank: int = 0  # 0 -> memory.default_predictor_rank(cfg) (predictor mode only)
    gpu_sparse: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.cold_mode not in COLD_MODES:
            raise InputError(f"unknown cold-neuron mode {self.cold_mode!r}", f"use one of: {', '.join(COLD_MODES)}")
        if self.cold_mode == "predictor" and not self.predictor_rank:
            object.__setattr__(self, "predictor_rank", default_predictor_rank(self.cfg))
        if self.gpu_sparse and self.cold_mode != "predictor":
            raise InputError("a sparse GPU side needs a predictor to pick its active rows",
                             "use --cold-mode predictor with --gpu-sparse, or drop --gpu-sparse")
        if self.gpu_sparse and not self.hw.gpu.sparse_bandwidth:
            raise InputError(f"hardware {self.hw.name!r} has no gpu.sparse_bandwidth",
                             "measure it with `hotcold calibrate` on the GPU machine, or drop --gpu-sparse")

    # ---- bytes and scalar times -----------------------------------------------------------------
    @cached_property
    def neuron(self):
        return neuron_bytes(self.cfg, self.dtype)

    @property
    def overlap(self) -> bool:
        """GPU and CPU sides run in parallel (a discrete GPU); False: one memory bus, times add up."""
        return not self.hw.link.shared_memory

    @property
    def sync_s(self) -> float:
        return 0.0 if self.hw.link.shared_memory else self.hw.link.sync_seconds

    @property
    def host_s(self) -> float:
        """Host/exchange overhead per layer with CPU work, beyond the sync itself (not in C_l)."""
        return self.hw.link.host_overhead_seconds

    @property
    def split_s(self) -> float:
        """Everything a layer with a cold neuron pays once: sync + host overhead."""
        return self.sync_s + self.host_s

    @cached_property
    def pre_bytes(self) -> int:
        """GPU bytes read per layer before the FFN split: attention weights, norms, K/V, predictor."""
        d = dense_bytes(self.cfg, self.dtype)
        kv = kv_cache_bytes_per_layer(self.cfg, self.ctx_len, default_kv_dtype(self.dtype))
        pred = predictor_bytes(self.cfg, self.predictor_rank, self.dtype) if self.cold_mode == "predictor" else 0
        return d.per_layer + kv + pred

    @property
    def pre_s(self) -> float:
        return self.pre_bytes / self.hw.gpu.bandwidth

    @cached_property
    def head_s(self) -> float:
        d = dense_bytes(self.cfg, self.dtype)
        head = d.lm_head if d.lm_head else d.embedding  # a tied head reads the embedding matrix
        return (head + d.final_norm + row_bytes(self.cfg.dim, self.dtype)) / self.hw.gpu.bandwidth

    # ---- per-neuron times -----------------------------------------------------------------------
    def gpu_neuron_s(self, p: np.ndarray) -> np.ndarray:
        """Seconds the GPU spends per token on a hot neuron of activation frequency p."""
        p = np.asarray(p, dtype=np.float64)
        if self.gpu_sparse:
            return p * (self.neuron.total / self.hw.gpu.sparse_bandwidth)
        return np.full(p.shape, self.neuron.total / self.hw.gpu.bandwidth)

    def cpu_neuron_s(self, p: np.ndarray) -> np.ndarray:
        """Seconds the CPU spends per token on a cold neuron of activation frequency p."""
        p = np.asarray(p, dtype=np.float64)
        nb, bw = self.neuron, self.hw.cpu.bandwidth
        if self.cold_mode == "threshold":
            return (nb.gate + p * (nb.up + nb.down)) / bw
        if self.cold_mode == "predictor":
            return p * (nb.total / bw)
        return np.full(p.shape, nb.total / bw)

    def breakeven_frequency(self) -> float | None:
        """Activation frequency below which a neuron costs less time on the CPU than on the GPU.

        Dense GPU side: threshold mode never (reading the gate row alone costs B_gate/BW_cpu >
        B_n/BW_gpu on any machine whose GPU is 3× faster); predictor mode BW_cpu/BW_gpu (≈ 2.3% on the
        H200 machine); exact mode never. None when it does not depend on p (sparse GPU side).
        """
        if self.gpu_sparse:
            return None
        nb, r = self.neuron, self.hw.cpu.bandwidth / self.hw.gpu.bandwidth
        if self.cold_mode == "threshold":
            return float(np.clip((nb.total * r - nb.gate) / (nb.up + nb.down), 0.0, 1.0))
        if self.cold_mode == "predictor":
            return float(min(1.0, r))
        return 1.0 if r >= 1 else 0.0

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "cold_mode": self.cold_mode, "ctx_len": self.ctx_len,
                "predictor_rank": self.predictor_rank if self.cold_mode == "predictor" else None,
                "gpu_sparse": self.gpu_sparse, "overlap": self.overlap,
                "neuron_bytes": {"gate": self.neuron.gate, "up": self.neuron.up, "down": self.neuron.down},
                "pre_bytes_per_layer": self.pre_bytes, "pre_ms_per_layer": self.pre_s * 1e3,
                "head_ms": self.head_s * 1e3, "sync_ms": self.sync_s * 1e3, "host_ms": self.host_s * 1e3,
                "breakeven_frequency": self.breakeven_frequency()}


@dataclass(frozen=True)
class LayerTimes:
    """Modelled seconds per token, per layer (arrays [n_layers]) and in total."""

    pre: np.ndarray  # attention etc. on the GPU, before the split
    gpu: np.ndarray  # hot FFN neurons on the GPU
    cpu: np.ndarray  # cold FFN neurons on the CPU
    sync: np.ndarray  # exchange when the layer has cold neurons
    total: np.ndarray  # pre + max(gpu, cpu) + sync + host  (pre + gpu + cpu + sync + host on one memory bus)
    head: float
    host: np.ndarray | None = None  # host overhead when the layer has cold neurons (None: zeros)

    def __post_init__(self):
        if self.host is None:
            object.__setattr__(self, "host", np.zeros_like(self.sync))

    @property
    def per_token(self) -> float:
        return float(self.total.sum() + self.head)


class ProfileCosts:
    """A cost model applied to one profile: per-layer prefix sums over neurons sorted by frequency.

    `f_sorted[l]` is layer l's frequencies in descending order; a placement with k hot neurons in layer l
    puts the first k of that order on the GPU. All times are seconds. Per-neuron times are affine in f,
    so every prefix sum of time is derived from the prefix sum of f (`cum_f`, [L, n+1]) on demand.
    """

    def __init__(self, cm: CostModel, f_sorted: np.ndarray):
        self.cm = cm
        self.f = np.asarray(f_sorted, dtype=np.float64)
        L, n = self.f.shape
        if (L, n) != (cm.cfg.n_layers, cm.cfg.n_ff):
            raise InputError(f"profile has shape {L}x{n}, the model {cm.cfg.n_layers}x{cm.cfg.n_ff}",
                             "use the profile of this model")
        self.cum_f = np.zeros((L, n + 1))
        np.cumsum(self.f, axis=1, out=self.cum_f[:, 1:])
        nb, bw_cpu = cm.neuron, cm.hw.cpu.bandwidth
        # prefix time = a·k + b·Σf over the first k neurons
        if cm.gpu_sparse:
            self._gpu_ab = (0.0, nb.total / cm.hw.gpu.sparse_bandwidth)
        else:
            self._gpu_ab = (nb.total / cm.hw.gpu.bandwidth, 0.0)
        self._cpu_ab = {"threshold": (nb.gate / bw_cpu, (nb.up + nb.down) / bw_cpu),
                        "predictor": (0.0, nb.total / bw_cpu),
                        "exact": (nb.total / bw_cpu, 0.0)}[cm.cold_mode]

    @property
    def n_layers(self) -> int:
        return self.f.shape[0]

    @property
    def n_ff(self) -> int:
        return self.f.shape[1]

    def _cum(self, ab: tuple[float, float], k: np.ndarray | None) -> np.ndarray:
        a, b = ab
        if k is None:
            k = np.broadcast_to(np.arange(self.n_ff + 1), self.cum_f.shape)
        k = np.asarray(k).reshape(self.n_layers, -1)
        out = a * k.astype(np.float64)
        if b:
            out = out + b * np.take_along_axis(self.cum_f, k, axis=1)
        return out

    def gpu_cum(self, k: np.ndarray | None = None) -> np.ndarray:
        """GPU seconds of the first k neurons of each layer, [L, m] for k of shape [L, m] (None: all k)."""
        return self._cum(self._gpu_ab, k)

    def cpu_cum(self, k: np.ndarray | None = None) -> np.ndarray:
        """CPU seconds of the first k neurons of each layer if they were cold."""
        return self._cum(self._cpu_ab, k)

    @property
    def cpu_total(self) -> np.ndarray:
        """[L, 1] CPU seconds of the whole layer's FFN."""
        return self.cpu_cum(np.full((self.n_layers, 1), self.n_ff))

    def gpu_at(self, k: np.ndarray) -> np.ndarray:
        """GPU FFN seconds with k hot neurons (k: [L, m])."""
        return self.gpu_cum(k)

    def cpu_at(self, k: np.ndarray) -> np.ndarray:
        """CPU FFN seconds with k hot neurons, i.e. the rest cold (k: [L, m])."""
        return self.cpu_total - self.cpu_cum(k)

    def times(self, n_hot: np.ndarray) -> LayerTimes:
        k = np.asarray(n_hot, dtype=np.int64).reshape(self.n_layers, 1)
        g, c = self.gpu_at(k)[:, 0], self.cpu_at(k)[:, 0]
        split = k[:, 0] < self.n_ff
        sync, host = self.cm.sync_s * split, self.cm.host_s * split
        pre = np.full(self.n_layers, self.cm.pre_s)
        total = pre + (np.maximum(g, c) if self.cm.overlap else g + c) + sync + host
        return LayerTimes(pre=pre, gpu=g, cpu=c, sync=sync, total=total, head=self.cm.head_s, host=host)

    def gpu_share(self, n_hot: np.ndarray) -> np.ndarray:
        """Expected share of the layer's activations that hot neurons serve."""
        k = np.asarray(n_hot, dtype=np.int64).reshape(self.n_layers, 1)
        served = np.take_along_axis(self.cum_f, k, axis=1)[:, 0]
        tot = self.cum_f[:, -1]
        return np.divide(served, tot, out=np.ones_like(tot), where=tot > 0)

    def min_hot(self) -> np.ndarray:
        """C_l per layer: the fewest hot neurons whose time saved covers one sync (PowerInfer Eq. 7-8).

        PowerInfer's C_l = T_sync / (T_cpu,n − T_gpu,n) with one per-neuron time; here the saving of the
        layer's own hottest neurons is summed until it reaches T_sync (the same number when all neurons
        cost the same). A layer whose neurons never save T_sync gets C_l = n_ff (all hot or none).
        T_sync only: the host overhead (`CostModel.host_s`) is paid with or without hot neurons.
        """
        sync = self.cm.sync_s
        c = np.full(self.n_layers, self.n_ff, dtype=np.int64)
        if sync <= 0:
            return np.zeros(self.n_layers, dtype=np.int64)
        todo = np.arange(self.n_layers)
        width = 256
        while todo.size:
            w = min(width, self.n_ff + 1)
            k = np.broadcast_to(np.arange(w), (self.n_layers, w))
            saving = (self.cpu_cum(k) - self.gpu_cum(k))[todo]
            reach = saving >= sync
            hit = reach.any(axis=1)
            c[todo[hit]] = reach[hit].argmax(axis=1)
            todo = todo[~hit]
            if w == self.n_ff + 1:
                break
            width *= 16
        return c
