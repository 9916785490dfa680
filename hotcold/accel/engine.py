"""The hybrid decode engine: attention and hot neurons on the GPU, cold neurons on the CPU, overlapped.

One decode step (batch 1) per layer l, in stream order on the GPU and in program order on the host:

    GPU  pre(l)   h += y(l-1) (the previous layer's CPU partial); attention; x = ffn_norm(h); the
                  selector's cold mask (predictor mode)
    copy send(l)  x (and the cold mask) to pinned host buffers; record an event
    GPU  hot(l)   h += down_hot · (silu(gate_hot x) * up_hot x)          ← runs while the CPU works
    CPU  cold(l)  wait for the event; the cold kernel (hotcold.accel.kernels) writes y(l) into a
                  pinned buffer; y(l) goes to the GPU (non-blocking), where pre(l+1) adds it

Consecutive GPU operations without a CPU exchange between them (a layer with no cold neuron, the
embedding, the head) form one segment; on CUDA each segment is captured once as a CUDA graph and
replayed (few launches per layer: 2 graph launches + 2 copies + 1 event), everything position-dependent
reading device tensors (`pos`, `tok`). On a machine without CUDA the "GPU" side runs on the CPU
eagerly through the same functions (design.md §5), so every path is tested in CI.

Layout on the GPU side: hot_gu [k, 2, D] (gate row, up row of hot slot s, so a prefix of slots is a
valid smaller hot set), hot_down [k, D]; on the CPU side the Bundle's cold_gate [C, D] and
cold_up_down [C, 2D]. Slot s / j holds neuron hot_ids[s] / cold_ids[j]; the dynamic mode
(hotcold.accel.dynamic) swaps neurons between slots while generating.

Cold modes: `exact` (every cold neuron: the dense model's output), `threshold` (|silu(g)| > t_l, on
both sides unless sparse_hot=False keeps hot neurons dense as hotcold.runtime does; t_l may be adjusted
online for a target density), `predictor` (a GPU selector picks the
cold neurons; see `hotcold.accel.selectors`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.accel.kernels import MODES, ColdKernel
from hotcold.model.config import ModelConfig
from hotcold.model.dense import rms_norm, rope_frequencies


@dataclass
class GpuLayer:
    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2 KV) Hd, D]
    wo: torch.Tensor  # [D, H Hd]
    ffn_norm: torch.Tensor  # [D]
    hot_gu: torch.Tensor  # [k, 2, D]: gate row, up row of each hot slot
    hot_down: torch.Tensor  # [k, D]: down column of each hot slot, as a row
    hot_ids: np.ndarray  # [k] int64 neuron id of each hot slot
    bqkv: torch.Tensor | None = None  # [(H + 2 KV) Hd]

    @property
    def n_hot(self) -> int:
        return int(self.hot_gu.shape[0])


@dataclass
class CpuLayer:
    gate: torch.Tensor  # [C, D]
    up_down: torch.Tensor  # [C, 2D]
    cold_ids: np.ndarray  # [C] int64

    @property
    def n_cold(self) -> int:
        return int(self.gate.shape[0])


@dataclass
class StepStats:
    """Per decode step, summed over layers."""

    seconds: float = 0.0
    cpu_kernel_s: float = 0.0
    cpu_wait_s: float = 0.0  # host waiting for the GPU's FFN input
    cpu_bytes: int = 0
    cold_active: int = 0
    gpu_s: float = 0.0  # GPU busy time in the segments (only with engine.time_gpu, CUDA events)
    launch_s: float = 0.0  # host time launching GPU segments and copies
    prep_s: float = 0.0  # host time between the GPU's FFN input arriving and the kernel starting
    post_s: float = 0.0  # host time after the kernel (sending y back, statistics)


@dataclass
class Totals:
    tokens: int = 0
    seconds: float = 0.0
    cpu_kernel_s: float = 0.0
    cpu_wait_s: float = 0.0
    cpu_bytes: int = 0
    cold_active: int = 0
    gpu_s: float = 0.0
    launch_s: float = 0.0
    prep_s: float = 0.0
    post_s: float = 0.0
    per_token_s: list[float] = field(default_factory=list)

    def add(self, s: StepStats) -> None:
        self.tokens += 1
        self.seconds += s.seconds
        self.cpu_kernel_s += s.cpu_kernel_s
        self.cpu_wait_s += s.cpu_wait_s
        self.cpu_bytes += s.cpu_bytes
        self.cold_active += s.cold_active
        self.gpu_s += s.gpu_s
        self.launch_s += s.launch_s
        self.prep_s += s.prep_s
        self.post_s += s.post_s
        self.per_token_s.append(s.seconds)


def rope_tables(cfg: ModelConfig, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, rope_frequencies(cfg))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


class HybridEngine:
    """Decode at batch 1 with a neuron split. Build with `hotcold.accel.build` helpers."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, norm: torch.Tensor, head: torch.Tensor,
                 gpu_layers: list[GpuLayer], cpu_layers: list[CpuLayer], *, cold_mode: str = "exact",
                 max_len: int = 512, thresholds: list[float] | None = None, selector: Any = None,
                 cpu_backend: str = "auto", cpu_threads: int | None = None, cpu_group: int | None = None,
                 cpu_dynamic: bool | None = None,
                 graphs: bool = True, gpu_kernels: str = "auto",
                 stats: bool = False, stat_thresholds: list[float] | None = None, sparse_hot: bool = True):
        if cold_mode not in MODES:
            raise ValueError(f"cold mode {cold_mode!r}")
        if cold_mode == "predictor" and selector is None:
            raise ValueError("predictor mode needs a selector")
        self.cfg = cfg
        self.device = embed.device
        self.cuda = self.device.type == "cuda"
        self.dtype = embed.dtype
        self.embed, self.norm, self.head = embed, norm, head
        self.gl, self.cl = gpu_layers, cpu_layers
        self.L = cfg.n_layers
        self.cold_mode = cold_mode
        # threshold mode: t_l also zeroes inactive hot neurons (the same function whatever the placement;
        # costs nothing: the hot rows are read anyway), or hot neurons stay dense as in hotcold.runtime
        self.sparse_hot = sparse_hot
        self.max_len = max_len
        self.selector = selector
        self.kernel = ColdKernel(cfg.dim, cpu_backend, cpu_threads, cpu_group, cpu_dynamic)
        self.graphs_wanted = graphs and self.cuda
        self.stats_on = stats
        self.events_external = False
        self.capture_error: str | None = None
        self.ops = self._resolve_gpu_kernels(gpu_kernels)
        dev, D = self.device, cfg.dim
        self.thr = np.array(thresholds if thresholds is not None else [0.0] * self.L, dtype=np.float64)
        self.stat_thr = np.array(stat_thresholds if stat_thresholds is not None else self.thr, dtype=np.float64)
        # device state (static addresses: graphs read them)
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h = torch.zeros(D, dtype=torch.float32, device=dev)
        self.y_dev = torch.zeros(D, dtype=torch.float32, device=dev)
        self.logits = torch.zeros(cfg.vocab_size, dtype=torch.float32, device=dev)
        self.mask_add = torch.zeros(max_len, dtype=torch.float32, device=dev)
        self.ar = torch.arange(max_len, device=dev)
        self.thr_dev = torch.tensor(self.thr, dtype=torch.float32, device=dev)
        self.stat_thr_dev = torch.tensor(self.stat_thr, dtype=torch.float32, device=dev)
        self.cos, self.sin = rope_tables(cfg, max_len, dev)
        KV, Hd = cfg.n_kv_heads, cfg.head_dim
        self.kc = [torch.zeros(KV, max_len, Hd, dtype=self.dtype, device=dev) for _ in range(self.L)]
        self.vc = [torch.zeros(KV, max_len, Hd, dtype=self.dtype, device=dev) for _ in range(self.L)]
        cmax = max([c.n_cold for c in cpu_layers] + [1])
        pin = self.cuda
        # what goes to the CPU each split layer is one contiguous copy of a float32 staging buffer:
        # x [D] | a send counter (int32 bits) | the cold mask (uint8, padded to whole words)
        self._stage_words = D + 1 + (cmax + 3) // 4
        self.stage_dev = torch.zeros(self._stage_words, dtype=torch.float32, device=dev)
        self.stage_host = torch.zeros(self._stage_words, dtype=torch.float32, pin_memory=pin)
        self.x = self.stage_dev[:D]
        self.send_tag = self.stage_dev[D:D + 1].view(torch.int32)
        self.cold_mask_dev = self.stage_dev[D + 1:].view(torch.uint8)[:cmax]
        self.x_host = self.stage_host[:D]
        self.mask_host = self.stage_host[D + 1:].view(torch.uint8)[:cmax]
        self._tag_host = self.stage_host[D:D + 1].view(torch.int32).numpy()
        self._tag_expected = 0
        self.tag_spins = 0  # sends whose data had not arrived when the event said so (should stay 0)
        self.y_host = torch.zeros(D, dtype=torch.float32, pin_memory=pin)
        kmax = max([g.n_hot for g in gpu_layers] + [1])
        H, KVh, Hdim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_buf = torch.zeros((H + 2 * KVh) * Hdim, dtype=torch.float32, device=dev)
        self.o_buf = torch.zeros(H * Hdim, dtype=torch.float32, device=dev)
        self.a_buf = torch.zeros(kmax, dtype=torch.float32, device=dev)
        self.s_buf = torch.zeros(kmax, dtype=torch.float32, device=dev)
        self.active = [torch.zeros(c.n_cold, dtype=torch.uint8) for c in cpu_layers]
        # neuron id of every slot, on the device (selectors map id-space decisions to slots with them)
        self.hot_ids_dev = [torch.as_tensor(g.hot_ids, dtype=torch.long).to(dev) for g in gpu_layers]
        self.cold_ids_dev = [torch.as_tensor(c.cold_ids, dtype=torch.long).to(dev) for c in cpu_layers]
        # per-slot activity counts since the last read (dynamic mode's statistics)
        self.hot_count = [torch.zeros(g.n_hot, dtype=torch.float32, device=dev) for g in gpu_layers]
        self.cold_count = [np.zeros(c.n_cold, dtype=np.float32) for c in cpu_layers]
        self.count_tokens = 0
        # online activation-threshold control (threshold mode)
        self.target_density: float | None = None
        self.thr_gain = 0.05
        self.hot_active_dev = torch.zeros(self.L, dtype=torch.float32, device=dev)
        self.hot_active_host = torch.zeros(self.L, dtype=torch.float32, pin_memory=pin)
        self._cold_active_last = np.zeros(self.L)
        self.thr_history: list[list[float]] = []
        self.stream = torch.cuda.current_stream(dev) if self.cuda else None
        self.events = [self._external_event() for _ in range(self.L)] if self.cuda else []
        self.hooks: list[Callable[[HybridEngine], None]] = []  # called between tokens (migration commits)
        # on CUDA with graphs, each layer's send (copy to the host + event) is captured inside the graph, so a
        # split layer costs one graph launch: [y(l-1) in, h += y, attention, selector, send(l), hot(l)]
        self.send_in_graph = self.graphs_wanted and self.events_external
        self._plan = self._make_plan()
        self._graphs: list[Any] | None = None
        self.host_pos = 0  # tokens in the KV cache (a host copy of `pos`, no sync needed)
        self.time_gpu = False  # bracket every GPU segment with CUDA events (adds a little host time)
        self.totals = Totals()

    # ---- plan --------------------------------------------------------------------------------
    def split(self, l: int) -> bool:
        return self.cl[l].n_cold > 0

    def _external_event(self):
        try:
            ev = torch.cuda.Event(external=True)
            self.events_external = True
        except TypeError:  # an older torch: sends stay outside the graphs
            ev = torch.cuda.Event()
            self.events_external = False
        return ev

    def _resolve_gpu_kernels(self, choice: str):
        from hotcold.accel import triton_ops

        if choice not in ("auto", "torch", "triton"):
            raise ValueError(f"gpu kernels {choice!r}: use auto, torch or triton")
        if choice == "torch" or (choice == "auto" and not self.cuda):
            return None
        if not triton_ops.available(self.device):
            if choice == "triton":
                from hotcold.errors import InputError

                raise InputError("the Triton GPU kernels were asked for but triton cannot run here",
                                 "install triton (CUDA), set TRITON_INTERPRET=1 on a CPU, or use --gpu-kernels torch")
            return None
        return triton_ops.GpuOps(self.device)

    @property
    def gpu_kernels(self) -> str:
        return "triton" if self.ops is not None else "torch"

    def _make_plan(self) -> list[tuple[str, Any]]:
        """[("gpu", [fns]), ("send", l), ("cpu", l), ...] for one decode step (sends inside "gpu" when captured)."""
        ops: list[tuple[str, Any]] = [("g", self._embed)]
        for l in range(self.L):
            ops.append(("g", self._pre_fn(l)))
            if self.split(l):
                ops.append(("g", self._send_fn(l)) if self.send_in_graph else ("send", l))
            if self.gl[l].n_hot:
                ops.append(("g", self._hot_fn(l)))
            if self.split(l):
                ops.append(("cpu", l))
        ops.append(("g", self._head))
        plan: list[tuple[str, Any]] = []
        for kind, v in ops:
            if kind == "g":
                if plan and plan[-1][0] == "gpu":
                    plan[-1][1].append(v)
                else:
                    plan.append(("gpu", [v]))
            else:
                plan.append((kind, v))
        return plan

    @property
    def n_segments(self) -> int:
        return sum(1 for k, _ in self._plan if k == "gpu")

    # ---- GPU side ----------------------------------------------------------------------------
    def _embed(self) -> None:
        self.h.copy_(self.embed.index_select(0, self.tok)[0].float())
        if self.ops is None:  # the fused attention masks by position itself
            self.mask_add.copy_(torch.where(self.ar <= self.pos, 0.0, float("-inf")))

    def _pre_fn(self, l: int) -> Callable[[], None]:
        def pre() -> None:
            if l > 0 and self.split(l - 1):
                self._receive()
            if self.ops is not None:
                self._attention_fused(l)
                if self.split(l):  # the CPU needs x; otherwise the hot gemv applies the norm itself
                    self.ops.rmsnorm(self.h, self.gl[l].ffn_norm, self.cfg.norm_eps, self.x)
            else:
                self._attention(l)
                self.x.copy_(rms_norm(self.h, self.gl[l].ffn_norm.float(), self.cfg.norm_eps))
            if self.cold_mode == "predictor" and self.split(l):
                C = self.cl[l].n_cold
                if hasattr(self.selector, "fill_cold_mask"):
                    self.selector.fill_cold_mask(self, l, self.x, self.cold_mask_dev[:C])
                else:
                    self.cold_mask_dev[:C].copy_(self.selector.cold_mask(self, l, self.x))
        return pre

    def _receive(self) -> None:
        """h += y, the previous split layer's CPU partial sum (copied in from its pinned buffer on CUDA)."""
        if self.cuda:
            self.y_dev.copy_(self.y_host, non_blocking=True)
        self.h.add_(self.y_dev)

    def _attention_fused(self, l: int) -> None:
        g, ops, cfg = self.gl[l], self.ops, self.cfg
        ops.gemv(g.wqkv, self.qkv_buf, h=self.h, nw=g.attn_norm, eps=cfg.norm_eps)
        if g.bqkv is not None:
            self.qkv_buf.add_(g.bqkv.float())
        ops.attention(self.qkv_buf, self.kc[l], self.vc[l], self.cos, self.sin, self.pos, self.o_buf, cfg.n_heads)
        ops.gemv(g.wo, self.h, x=self.o_buf, acc=True)

    def _attention(self, l: int) -> None:
        cfg, g = self.cfg, self.gl[l]
        H, KV, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        xn = rms_norm(self.h, g.attn_norm.float(), cfg.norm_eps).to(self.dtype)
        qkv = F.linear(xn, g.wqkv, g.bqkv)
        q, k, v = qkv.split([H * Hd, KV * Hd, KV * Hd])
        cos = self.cos.index_select(0, self.pos).to(self.dtype)  # [1, Hd]
        sin = self.sin.index_select(0, self.pos).to(self.dtype)
        q, k = self._rope(q.view(H, Hd), cos, sin), self._rope(k.view(KV, Hd), cos, sin)
        self.kc[l].index_copy_(1, self.pos, k.view(KV, 1, Hd))
        self.vc[l].index_copy_(1, self.pos, v.view(KV, 1, Hd))
        G = H // KV
        s = torch.matmul(q.view(KV, G, Hd).float(), self.kc[l].float().transpose(1, 2)) if self.dtype == torch.float32 \
            else torch.matmul(q.view(KV, G, Hd), self.kc[l].transpose(1, 2)).float()
        p = torch.softmax(s * (1.0 / math.sqrt(Hd)) + self.mask_add, dim=-1).to(self.dtype)
        o = torch.matmul(p, self.vc[l]).reshape(H * Hd)  # [KV, G, Hd] -> [H Hd]
        self.h.add_(F.linear(o, g.wo).float())

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _hot_fn(self, l: int) -> Callable[[], None]:
        def hot() -> None:
            if self.ops is not None:
                return self._hot_fused(l)
            g = self.gl[l]
            k, D = g.n_hot, self.cfg.dim
            gu = F.linear(self.x.to(self.dtype), g.hot_gu.view(2 * k, D)).view(k, 2).float()
            s = F.silu(gu[:, 0])
            a = s * gu[:, 1]
            self._hot_activity(l, s, a)
            self.h.add_(torch.matmul(a.to(self.dtype), g.hot_down).float())
        return hot

    def _hot_activity(self, l: int, s: torch.Tensor, a: torch.Tensor) -> None:
        """Threshold mode: count the active hot neurons (|s| > t_l) and, with sparse_hot, zero the others'
        a in place; with statistics on, add each slot's activity to hot_count (dynamic mode's input)."""
        if self.cold_mode == "threshold":
            on = s.abs() > self.thr_dev[l]
            if self.sparse_hot:
                a.mul_(on)
            self.hot_active_dev[l] = on.sum()
        if self.stats_on:
            if self.cold_mode == "predictor":
                self.hot_count[l].add_(self.selector.hot_active(self, l, self.x))
            else:
                self.hot_count[l].add_((s.abs() > self.stat_thr_dev[l]).float())

    def _hot_fused(self, l: int) -> None:
        g, ops = self.gl[l], self.ops
        k = g.n_hot
        a, s = self.a_buf[:k], self.s_buf[:k]
        need_s = self.cold_mode == "threshold" or (self.stats_on and self.cold_mode != "predictor")
        src = dict(x=self.x) if self.split(l) else dict(h=self.h, nw=g.ffn_norm, eps=self.cfg.norm_eps)
        ops.gate_up(g.hot_gu, a, s_out=s if need_s else None, **src)
        self._hot_activity(l, s, a)
        ops.vecmat_add(a, g.hot_down, self.h)

    def _head(self) -> None:
        if self.split(self.L - 1):
            self._receive()
        if self.ops is not None:
            self.ops.gemv(self.head, self.logits, h=self.h, nw=self.norm, eps=self.cfg.norm_eps)
        else:
            xn = rms_norm(self.h, self.norm.float(), self.cfg.norm_eps).to(self.dtype)
            self.logits.copy_(F.linear(xn, self.head).float())
        self.tok.copy_(self.logits.argmax().view(1))
        self.pos.add_(1)

    # ---- CPU side ----------------------------------------------------------------------------
    def _send_fn(self, l: int) -> Callable[[], None]:
        return lambda: self._send(l)

    def _send(self, l: int) -> None:
        """x, a send counter and (predictor mode) the cold mask to the pinned host buffer, then layer l's event."""
        if self.cuda:
            n = self.cfg.dim + 1 + ((self.cl[l].n_cold + 3) // 4 if self.cold_mode == "predictor" else 0)
            self.send_tag.add_(1)
            self.stage_host[:n].copy_(self.stage_dev[:n], non_blocking=True)
            self.events[l].record()

    def _cold(self, l: int, st: StepStats) -> None:
        c = self.cl[l]
        C = c.n_cold
        t0 = time.perf_counter()
        if self.cuda:
            self.events[l].synchronize()
            self._tag_expected += 1
            if int(self._tag_host[0]) != self._tag_expected:
                self._wait_tag()
            x = self.x_host
        else:
            x = self.x
        t1 = time.perf_counter()
        mask = None
        if self.cold_mode == "predictor":
            mask = (self.mask_host if self.cuda else self.cold_mask_dev)[:C]
        thr = float(self.thr[l] if self.cold_mode == "threshold" else self.stat_thr[l])
        out = self.y_host if self.cuda else self.y_dev
        t2 = time.perf_counter()
        act = mask if mask is not None else self.active[l]
        # the statistics: the kernel counts active slots itself (exact mode computes all: counted below)
        counts = self.cold_count[l] if self.stats_on and self.cold_mode != "exact" else None
        r = self.kernel(x, c.gate, c.up_down, self.cold_mode, mask=mask, thr=thr, active=act, out=out, counts=counts)
        t3 = time.perf_counter()
        st.cpu_wait_s += t1 - t0
        st.prep_s += t2 - t1
        st.cpu_kernel_s += t3 - t2
        st.cpu_bytes += r.bytes_read
        st.cold_active += r.n_active
        self._cold_active_last[l] = r.n_active
        if self.stats_on:
            if self.cold_mode == "exact":
                # exact mode computes every neuron; activity for the statistics is |s| > stat_thr
                self._exact_activity(l, x)
                self.cold_count[l] += act.numpy()
        st.post_s += time.perf_counter() - t3

    def _wait_tag(self, timeout_s: float = 5.0) -> None:
        """The event said done but the counter is not there yet: spin on the pinned buffer (counted)."""
        self.tag_spins += 1
        t_end = time.perf_counter() + timeout_s
        while int(self._tag_host[0]) != self._tag_expected:
            if time.perf_counter() > t_end:
                raise RuntimeError(f"layer exchange out of step: send counter {int(self._tag_host[0])}, "
                                   f"expected {self._tag_expected}")

    def _sync_tag(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._tag_expected = int(self.send_tag.item())

    def _exact_activity(self, l: int, x: torch.Tensor) -> None:
        c = self.cl[l]
        g = F.silu(c.gate.float() @ x)
        self.active[l].copy_((g.abs() > float(self.stat_thr[l])).to(torch.uint8))

    # ---- running -----------------------------------------------------------------------------
    def _run_segment(self, i: int, fns: list[Callable[[], None]]) -> None:
        if self._graphs is not None:
            self._graphs[i].replay()
        else:
            for f in fns:
                f()

    def capture(self) -> None:
        """Capture every GPU segment as a CUDA graph (after eager warm-up steps at position 0).

        With the sends inside the graphs first; if this torch/driver cannot capture them (pinned copies or
        external events refused), again with the sends outside (two graphs per split layer)."""
        if not self.graphs_wanted or self._graphs is not None:
            return
        try:
            self._capture()
        except Exception as ex:  # noqa: BLE001 - fall back to what always captures
            if not self.send_in_graph:
                raise
            self.capture_error = repr(ex)[:300]
            torch.cuda.synchronize(self.device)
            self.send_in_graph = False
            self._plan = self._make_plan()
            self._graphs = None
            self._capture()

    def _capture(self) -> None:
        saved_pos, saved_host = self.pos.clone(), self.host_pos
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                for kind, v in self._plan:
                    if kind == "gpu":
                        for f in v:
                            f()
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        graphs, pool = [], None
        for kind, v in self._plan:
            if kind != "gpu":
                continue
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                for f in v:
                    f()
            pool = g.pool()
            graphs.append(g)
        torch.cuda.synchronize(self.device)
        self._graphs = graphs
        self.reset()
        self.pos.copy_(saved_pos)
        self.host_pos = saved_host

    def reset(self) -> None:
        """Forget the context (KV cache, position)."""
        self.pos.zero_()
        self.host_pos = 0
        self.h.zero_()
        self.y_dev.zero_()
        for k, v in zip(self.kc, self.vc):
            k.zero_()
            v.zero_()
        self.totals = Totals()
        self._sync_tag()

    @torch.inference_mode()
    def step(self, token: int | None = None) -> StepStats:
        """One decode step; token None feeds back the previous step's argmax (no host sync)."""
        if self.host_pos >= self.max_len:
            from hotcold.errors import InputError

            raise InputError(f"the context is full ({self.max_len} tokens)", "raise --max-len, or reset the engine")
        self.host_pos += 1
        for hook in self.hooks:
            hook(self)
        if token is not None:
            self.tok.fill_(int(token))
        if self.target_density is not None and self.cold_mode == "threshold":
            self._adjust_thresholds()
        st = StepStats()
        t0 = time.perf_counter()
        seg = 0
        evs = []
        for kind, v in self._plan:
            ta = time.perf_counter()
            if kind == "gpu":
                if self.time_gpu and self.cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    self._run_segment(seg, v)
                    b.record()
                    evs.append((a, b))
                else:
                    self._run_segment(seg, v)
                seg += 1
                st.launch_s += time.perf_counter() - ta
            elif kind == "send":
                self._send(v)
                st.launch_s += time.perf_counter() - ta
            else:
                self._cold(v, st)
        if self.cuda:
            if self.target_density is not None:
                self.hot_active_host.copy_(self.hot_active_dev, non_blocking=True)
            ta = time.perf_counter()
            torch.cuda.current_stream(self.device).synchronize()
            st.cpu_wait_s += time.perf_counter() - ta
        st.seconds = time.perf_counter() - t0
        st.gpu_s = sum(a.elapsed_time(b) for a, b in evs) * 1e-3
        if self.stats_on:
            self.count_tokens += 1
        self.totals.add(st)
        return st

    def prefill(self, ids: list[int]) -> None:
        """Feed a prompt token by token (decode steps; prefill speed is not this engine's goal)."""
        for t in ids:
            self.step(t)

    @torch.inference_mode()
    def generate(self, ids: list[int], n_new: int) -> list[int]:
        self.prefill(ids)
        out = []
        for _ in range(n_new):
            out.append(int(self.tok.item()))
            self.step(None)
        return out

    # ---- online activation threshold ---------------------------------------------------------
    def hold_density(self, target: float, gain: float = 0.05) -> None:
        """Adjust t_l after every token so each layer's active fraction tracks `target` (threshold mode)."""
        if self.cold_mode != "threshold":
            raise ValueError("holding a target density needs threshold mode")
        self.target_density = float(target)
        self.thr_gain = gain

    def _adjust_thresholds(self) -> None:
        if self.totals.tokens == 0:
            return
        hot = self.hot_active_host.numpy() if self.cuda else self.hot_active_dev.cpu().numpy()
        n = self.cfg.n_ff
        d = (hot + self._cold_active_last) / n
        self.last_density = d.copy()
        err = d - self.target_density
        self.thr = np.clip(self.thr * np.exp(self.thr_gain * err / max(self.target_density, 1e-3)), 1e-6, 1e3)
        self.thr_dev.copy_(torch.from_numpy(self.thr.astype(np.float32)), non_blocking=False)
        self.thr_history.append([float(v) for v in self.thr])

    # ---- accounting --------------------------------------------------------------------------
    def gpu_bytes_per_token(self) -> int:
        """Weight and KV bytes the GPU side reads per token (attention, hot rows, head; KV at max_len)."""
        es = self.embed.element_size()
        b = self.head.numel() * es + self.cfg.dim * es
        for g in self.gl:
            b += (g.wqkv.numel() + g.wo.numel() + g.hot_gu.numel() + g.hot_down.numel()) * es
            b += 2 * self.kc[0].numel() * self.kc[0].element_size()
        if self.selector is not None and hasattr(self.selector, "bytes_per_token"):
            b += self.selector.bytes_per_token()
        return int(b)

    def memory(self) -> dict[str, int]:
        es = self.embed.element_size()
        gpu = (self.embed.numel() + self.head.numel() + self.norm.numel()) * es
        gpu += sum((g.wqkv.numel() + g.wo.numel() + g.hot_gu.numel() + g.hot_down.numel()
                    + g.attn_norm.numel() + g.ffn_norm.numel()) * es for g in self.gl)
        gpu += sum(k.numel() * k.element_size() * 2 for k in self.kc)
        cpu = sum((c.gate.numel() + c.up_down.numel()) * c.gate.element_size() for c in self.cl)
        return {"gpu_weights_and_kv": int(gpu), "cpu_cold": int(cpu)}

    def hot_counts(self) -> list[np.ndarray]:
        return [c.cpu().numpy() for c in self.hot_count]
