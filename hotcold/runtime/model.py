"""The hybrid model: attention and hot neurons on the GPU side, cold neurons on a CPU worker, overlapped.

One object runs every Bundle on every device (design.md §5): `hotcold run`, `bench`, `study`, `serve`
and the tests all build it (hotcold.runtime.build). On a machine without CUDA the "GPU" side runs on the
CPU through the same functions, with the CPU worker inline and no graphs; on CUDA the decode step is
captured as CUDA graphs, x and y cross through pinned buffers, the GPU side uses the fused Triton ops
(hotcold.runtime.triton_ops) and the CPU side the compiled cold kernel (hotcold.runtime.coldkernel).

Two ways through the model, over the same weights and KV cache:
- `forward(tokens [B, T], start, cache)`: a batched forward (prefill, teacher-forced evaluation) in plain
  torch. The prompt is computed densely (`prefill="dense"`) or with the decode path's rule per token
  (`sparse=True`).
- `step(token)`: one decode token at batch 1 through the plan below (graphs on CUDA).

One decode step per layer l, in stream order on the GPU and in program order on the host:

    GPU  pre(l)   h += y(l-1) (the previous layer's CPU partial); attention; x = ffn_norm(h); the
                  selector's cold mask (predictor mode)
    copy send(l)  x (and the cold mask) to pinned host buffers; record an event
    GPU  hot(l)   h += down_hot · (act(gate_hot x) * up_hot x)          ← runs while the CPU works
    CPU  cold(l)  wait for the event; the cold kernel writes y(l) into a pinned buffer; y(l) goes to
                  the GPU (non-blocking), where pre(l+1) adds it

Consecutive GPU operations without a CPU exchange between them form one segment; on CUDA each segment is
captured once as a CUDA graph and replayed, everything position-dependent reading device tensors (`pos`,
`tok`).

Layout on the GPU side: hot_gu [k, 2, D] (gate row, up row of hot slot s, so a prefix of slots is a
valid smaller hot set), hot_down [k, D]; on the CPU side the Bundle's cold rows as written, in either
layout (hotcold.bundle): `bundled` (cold_gate [C, D], cold_up_down [C, 2D]) or `split` (cold_gate_up_t
[D, 2C], cold_down [C, D]). Slot s / j holds neuron hot_ids[s] / cold_ids[j]; the dynamic mode
(hotcold.runtime.dynamic) swaps neurons between slots while generating (bundled layout).

Cold modes: `exact` (every cold neuron: the dense model's output), `threshold` (the Bundle's activation
rule with t_l per layer: `gate` |act(W_gate x)| > t_l, or `product` |act(W_gate x)·(W_up x)| > t_l; hot
neurons stay dense unless sparse_hot; t_l may be adjusted online for a target density), `predictor` (a
selector on the GPU side picks the cold neurons to compute: the Bundle's ONNX predictors, see
hotcold.runtime.selectors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig
from hotcold.model.dense import KVCache, Rope, attention, gemv_layout, rms_norm
from hotcold.quant import QTensor, dequantize
from hotcold.runtime.coldkernel import MODES, RULES, ColdKernel
from hotcold.runtime.stats import Measurements

PREFILL = ("dense", "sparse")


# ---- weights that may be quantized (hotcold.quant.QTensor) -----------------------------------------
# The plain-torch paths (a CPU "GPU side", the batched forward, the torch cold fallback) dequantize a
# quantized matrix where they use it (float32; nothing is kept); the decode step on CUDA reads the packed
# rows in the Triton kernels (hotcold.runtime.qtriton).
def weight_bytes(w: torch.Tensor | QTensor | None) -> int:
    """Bytes a weight holds (a QTensor's packed rows, scales included)."""
    if w is None:
        return 0
    return int(w.nbytes) if isinstance(w, QTensor) else w.numel() * w.element_size()


def linear(x: torch.Tensor, w: torch.Tensor | QTensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b); a QTensor in float32 (x and b converted), a float weight as F.linear does it."""
    if isinstance(w, QTensor):
        return F.linear(x.float(), dequantize(w), None if b is None else b.float())
    return F.linear(x, w, b)


def vecmat(a: torch.Tensor, w: torch.Tensor | QTensor) -> torch.Tensor:
    """a @ w for rows w [k, D] (the down rows); a QTensor in float32."""
    if isinstance(w, QTensor):
        return a.float() @ dequantize(w)
    return a @ w


@dataclass
class GpuLayer:
    """One layer's GPU side. Float weights, or quantized ones (hotcold.quant.QTensor) for wqkv, wo,
    hot_gu and hot_down; a quantized hot_gu is [2k, D] with rows 2s, 2s + 1 slot s's gate and up rows
    (the byte order of qtriton.qgate_up), the float one [k, 2, D]."""

    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor | QTensor  # [(H + 2 KV) Hd, D]
    wo: torch.Tensor | QTensor  # [D, H Hd]
    ffn_norm: torch.Tensor  # [D]
    hot_gu: torch.Tensor | QTensor  # [k, 2, D] (float) or [2k, D] (QTensor): gate row, up row of each hot slot
    hot_down: torch.Tensor | QTensor  # [k, D]: down column of each hot slot, as a row
    hot_ids: np.ndarray  # [k] int64 neuron id of each hot slot
    bqkv: torch.Tensor | None = None  # [(H + 2 KV) Hd]

    @property
    def n_hot(self) -> int:
        if isinstance(self.hot_gu, QTensor):
            return self.hot_gu.shape[0] // 2
        return int(self.hot_gu.shape[0])

    def gate_up_rows(self) -> torch.Tensor | QTensor:
        """[2k, D]: rows 2s, 2s + 1 = slot s's gate and up rows (a view of hot_gu)."""
        if isinstance(self.hot_gu, QTensor):
            return self.hot_gu
        return self.hot_gu.view(2 * self.n_hot, self.hot_gu.shape[-1])

    def tensors(self) -> list[Any]:
        return [t for t in (self.attn_norm, self.wqkv, self.wo, self.ffn_norm, self.hot_gu, self.hot_down, self.bqkv)
                if t is not None]


def _spread(per_token_s: list[float], skip: int = 8) -> dict[str, Any]:
    """Median and p90 of the decode steps' times, and the mean without the first `skip` steps (what a
    benchmark that warms up reports), so one slow first step is visible as such."""
    if not per_token_s:
        return {}
    p = sorted(per_token_s)
    rest = per_token_s[skip:] or per_token_s
    return {"ms_per_token_median": 1e3 * p[len(p) // 2], "ms_per_token_p90": 1e3 * p[int(0.9 * (len(p) - 1))],
            f"ms_per_token_after_{skip}": 1e3 * sum(rest) / len(rest),
            f"ms_first_{min(skip, len(per_token_s))}": [round(1e3 * t, 3) for t in per_token_s[:skip]]}


@dataclass
class CpuLayer:
    """One layer's cold neurons, in the Bundle's `bundled` or `split` layout (hotcold.bundle); bundled rows
    may be quantized (QTensor gate [C, D] and up_down [C, 2D] = quant.hcat(up, down), one format)."""

    cold_ids: np.ndarray  # [C] int64
    gate: torch.Tensor | QTensor | None = None  # bundled: [C, D]
    up_down: torch.Tensor | QTensor | None = None  # bundled: [C, 2D], row j = [up_j | down_j]
    gate_up_t: torch.Tensor | None = None  # split: [D, 2C], column j gate_j, column C + j up_j
    down: torch.Tensor | None = None  # split: [C, D], row j = down_j

    @property
    def layout(self) -> str:
        return "bundled" if self.gate is not None else "split"

    @property
    def n_cold(self) -> int:
        return int(self.cold_ids.shape[0])

    @property
    def quantized(self) -> bool:
        return isinstance(self.gate, QTensor)

    def tensors(self) -> list[Any]:
        return [t for t in (self.gate, self.up_down, self.gate_up_t, self.down) if t is not None]

    def gate_up_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_gate x, W_up x) of every cold neuron for x [N, D]: [N, C] each, in the weights' dtype
        (float32 for quantized rows)."""
        if self.quantized:
            D = self.gate.shape[1]
            return linear(x, self.gate), F.linear(x.float(), dequantize(self.up_down)[:, :D])
        if self.gate is not None:
            D = self.gate.shape[1]
            return F.linear(x, self.gate), F.linear(x, self.up_down[:, :D])
        return F.linear(x, self.gate_up_t.t()).chunk(2, dim=-1)

    def down_rows(self) -> torch.Tensor:
        """[C, D]: row j is cold neuron j's down column (a view; dequantized float32 for quantized rows)."""
        if self.quantized:
            return dequantize(self.up_down)[:, self.gate.shape[1]:]
        if self.down is not None:
            return self.down
        return self.up_down[:, self.up_down.shape[1] // 2:]


@dataclass
class StepStats:
    """Per decode step, summed over layers."""

    seconds: float = 0.0
    cpu_kernel_s: float = 0.0
    cpu_wait_s: float = 0.0  # host waiting for the GPU's FFN input
    cpu_bytes: int = 0
    cold_active: int = 0
    gpu_s: float = 0.0  # GPU busy time in the segments (only with time_gpu on CUDA; host time on a CPU)
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
        for k in ("seconds", "cpu_kernel_s", "cpu_wait_s", "cpu_bytes", "cold_active", "gpu_s", "launch_s",
                  "prep_s", "post_s"):
            setattr(self, k, getattr(self, k) + getattr(s, k))
        self.per_token_s.append(s.seconds)


class HybridModel:
    """A neuron split of a model, ready to generate. Build it with hotcold.runtime.build (from a Bundle,
    a Placement or explicit hot sets); see the module docstring."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, norm: torch.Tensor, head: torch.Tensor,
                 gpu_layers: list[GpuLayer], cpu_layers: list[CpuLayer], *, cold_mode: str = "exact",
                 rule: str = "gate", max_len: int = 512, thresholds: Sequence[float] | None = None,
                 selector: Any = None, prefill: str = "dense", sparse_hot: bool = False,
                 cpu_backend: str = "auto", cpu_threads: int | None = None, cpu_group: int | None = None,
                 cpu_dynamic: bool | None = None, graphs: bool = True, gpu_kernels: str = "auto",
                 stats: bool = False, stat_thresholds: Sequence[float] | None = None,
                 bundle: Any = None, account: Any = None, measure: bool = True, kv_dtype: torch.dtype | None = None):
        if cold_mode not in MODES:
            raise InputError(f"unknown mode {cold_mode!r}", f"use one of: {', '.join(MODES)}")
        if rule not in RULES:
            raise InputError(f"unknown activation rule {rule!r}", f"use one of: {', '.join(RULES)}")
        if prefill not in PREFILL:
            raise InputError(f"unknown prefill {prefill!r}", f"use one of: {', '.join(PREFILL)}")
        if cold_mode == "predictor" and selector is None:
            raise InputError("predictor mode needs a predictor", "export the bundle with --predictors, or use "
                             "--cold-mode threshold or exact")
        self.cfg = cfg
        self.bundle = bundle  # the Bundle it was loaded from (tokenizer, manifest), or None
        self.account = account  # hotcold.memory account of what it holds, when built from a Bundle
        self.device = embed.device
        self.cuda = self.device.type == "cuda"
        # quantized weights (hotcold.quant.QTensor): the plain-torch paths compute in float32 over the
        # dequantized values; the embedding stays a float tensor (float16 in a quantized Bundle)
        self.quantized = any(isinstance(w, QTensor) for g in gpu_layers for w in (g.wqkv, g.wo, g.hot_gu)) or \
            any(c.quantized for c in cpu_layers) or isinstance(head, QTensor)
        if self.quantized and any(c.n_cold and not c.quantized for c in cpu_layers):
            raise InputError("a quantized model needs quantized cold rows in the bundled layout",
                             "build every CpuLayer with QTensor gate and up_down (export with --dtype q4)")
        self.dtype = torch.float32 if self.quantized else embed.dtype  # activations of the plain-torch paths
        # the KV cache: the embedding's dtype unless asked (hotcold.memory.default_kv_dtype: float16 when quantized)
        self.kv_dtype = kv_dtype or embed.dtype
        self.embed, self.norm = embed, norm
        self.gl, self.cl = gpu_layers, cpu_layers
        self.L = cfg.n_layers
        self.cold_mode = cold_mode
        self.rule = rule
        self.prefill_mode = prefill
        self.act = F.silu if cfg.activation == "silu" else F.relu
        # threshold mode: t_l also zeroes inactive hot neurons (sparse_hot), or hot neurons stay dense
        self.sparse_hot = sparse_hot
        self.max_len = max_len
        self.selector = selector
        if self.quantized:
            from hotcold.runtime.qkernels import QColdKernel

            self.kernel = QColdKernel(cfg.dim, cpu_backend, cpu_threads, cpu_group, cpu_dynamic, activation=cfg.activation)
        else:
            self.kernel = ColdKernel(cfg.dim, cpu_backend, cpu_threads, cpu_group, cpu_dynamic, activation=cfg.activation)
        self.graphs_wanted = graphs and self.cuda
        self.stats_on = stats
        self.events_external = False
        self.capture_error: str | None = None
        self.ops = self._resolve_gpu_kernels(gpu_kernels)
        if self.ops is None and not self.cuda:
            # plain torch on a CPU: matrix-vector products stream [in, out] storage faster (dense.gemv_layout)
            for g in gpu_layers:
                if not isinstance(g.wqkv, QTensor):
                    g.wqkv, g.wo = gemv_layout(g.wqkv), gemv_layout(g.wo)
            if not isinstance(head, QTensor):
                head = gemv_layout(head) if head is not embed else gemv_layout(embed)
        self.head = head
        dev, D = self.device, cfg.dim
        if cold_mode != "exact" and thresholds is None and selector is None:
            raise InputError(f"--mode {cold_mode} needs activation thresholds",
                             "re-export with --profile and --sparsity (or --threshold), pass --threshold, or use --cold-mode exact")
        self.thr = np.array(thresholds if thresholds is not None else [0.0] * self.L, dtype=np.float64)
        self.stat_thr = np.array(stat_thresholds if stat_thresholds is not None else self.thr, dtype=np.float64)
        self.measure = Measurements(self.L, self.device, enabled=measure)
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
        self.rope = Rope(cfg, max_len, dev)
        self.cos, self.sin = self.rope.cos, self.rope.sin
        # the decode KV cache: a batch-1 dense KVCache, so a batched prefill fills what decoding reads
        self.cache = KVCache(cfg, 1, max_len, self.kv_dtype, dev)
        self.kc = [k[0] for k in self.cache.k]  # [KV, max_len, Hd] each
        self.vc = [v[0] for v in self.cache.v]
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
        # activated hot neurons per layer: this token's (online t_l) and the sum since reset (the report)
        self.hot_active_dev = torch.zeros(self.L, dtype=torch.float32, device=dev)
        self.hot_active_sum = torch.zeros(self.L, dtype=torch.float64, device=dev)
        self.hot_active_host = torch.zeros(self.L, dtype=torch.float32, pin_memory=pin)
        self._cold_active_last = np.zeros(self.L)
        self.cold_active_sum = np.zeros(self.L, dtype=np.int64)
        self.cpu_layer_s = np.zeros(self.L)
        self.gpu_layer_s = np.zeros(self.L)  # decode: host time of the GPU segments on a CPU, CUDA events with time_gpu
        # online activation-threshold control (threshold mode)
        self.target_density: float | None = None
        self.thr_gain = 0.05
        self.thr_history: list[list[float]] = []
        self.stream = torch.cuda.current_stream(dev) if self.cuda else None
        self.events = [self._external_event() for _ in range(self.L)] if self.cuda else []
        self.hooks: list[Callable[[HybridModel], None]] = []  # called between tokens (migration commits)
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
        from hotcold.runtime import triton_ops

        if choice not in ("auto", "torch", "triton"):
            raise InputError(f"unknown GPU kernels {choice!r}", "use auto, torch or triton")
        if choice == "torch" or (choice == "auto" and not self.cuda):
            return None
        if self.cfg.activation != "silu":
            if choice == "triton":
                raise InputError("the Triton GPU kernels compute SiLU gates only", "use --gpu-kernels torch")
            return None
        if not triton_ops.available(self.device):
            if choice == "triton":
                raise InputError("the Triton GPU kernels were asked for but triton cannot run here",
                                 "install triton (CUDA), set TRITON_INTERPRET=1 on a CPU, or use --gpu-kernels torch")
            return None
        if self.quantized:
            from hotcold.runtime.qtriton import QGpuOps

            return QGpuOps(self.device)
        return triton_ops.GpuOps(self.device)

    @property
    def gpu_kernels(self) -> str:
        return "triton" if self.ops is not None else "torch"

    def _make_plan(self) -> list[tuple[str, Any]]:
        """[("gpu", [fns]), ("send", l), ("cpu", l), ...] for one decode step (sends inside "gpu" when captured)."""
        ops: list[tuple[str, Any, int]] = [("g", self._embed, 0)]
        for l in range(self.L):
            ops.append(("g", self._pre_fn(l), l))
            if self.split(l):
                ops.append(("g", self._send_fn(l), l) if self.send_in_graph else ("send", l, l))
            if self.gl[l].n_hot:
                ops.append(("g", self._hot_fn(l), l))
            if self.split(l):
                ops.append(("cpu", l, l))
        ops.append(("g", self._head, self.L - 1))
        plan: list[tuple[str, Any]] = []
        self._seg_layer: list[int] = []  # the layer a GPU segment's time is charged to (its last op's)
        self._fn_layers: list[list[int]] = []  # the layer of each op of a segment (timed one by one on a CPU)
        for kind, v, l in ops:
            if kind == "g":
                if plan and plan[-1][0] == "gpu":
                    plan[-1][1].append(v)
                    self._seg_layer[-1] = l
                    self._fn_layers[-1].append(l)
                else:
                    plan.append(("gpu", [v]))
                    self._seg_layer.append(l)
                    self._fn_layers.append([l])
            else:
                plan.append((kind, v))
        return plan

    @property
    def n_segments(self) -> int:
        return sum(1 for k, _ in self._plan if k == "gpu")

    # ---- GPU side (decode) -------------------------------------------------------------------
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

    def _gemv(self, w: torch.Tensor | QTensor, out: torch.Tensor, **kw: Any) -> None:
        """The fused GEMV over a float or a quantized matrix (triton_ops.gemv / qtriton.qgemv)."""
        if isinstance(w, QTensor):
            self.ops.qgemv(w, out, **kw)
        else:
            self.ops.gemv(w, out, **kw)

    def _attention_fused(self, l: int) -> None:
        g, ops, cfg = self.gl[l], self.ops, self.cfg
        self._gemv(g.wqkv, self.qkv_buf, h=self.h, nw=g.attn_norm, eps=cfg.norm_eps)
        if g.bqkv is not None:
            self.qkv_buf.add_(g.bqkv.float())
        ops.attention(self.qkv_buf, self.kc[l], self.vc[l], self.cos, self.sin, self.pos, self.o_buf, cfg.n_heads)
        self._gemv(g.wo, self.h, x=self.o_buf, acc=True)

    def _attention(self, l: int) -> None:
        cfg, g = self.cfg, self.gl[l]
        H, KV, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        xn = rms_norm(self.h, g.attn_norm.float(), cfg.norm_eps).to(self.dtype)
        qkv = linear(xn, g.wqkv, g.bqkv)
        q, k, v = qkv.split([H * Hd, KV * Hd, KV * Hd])
        cos = self.cos.index_select(0, self.pos).to(self.dtype)  # [1, Hd]
        sin = self.sin.index_select(0, self.pos).to(self.dtype)
        q, k = self._rope(q.view(H, Hd), cos, sin), self._rope(k.view(KV, Hd), cos, sin)
        kd = self.kc[l].dtype  # float16 under float32 activations (quantized weights): rounded as stored
        self.kc[l].index_copy_(1, self.pos, k.view(KV, 1, Hd).to(kd))
        self.vc[l].index_copy_(1, self.pos, v.view(KV, 1, Hd).to(kd))
        G = H // KV
        s = torch.matmul(q.view(KV, G, Hd).float(), self.kc[l].float().transpose(1, 2)) if self.dtype == torch.float32 \
            else torch.matmul(q.view(KV, G, Hd), self.kc[l].transpose(1, 2)).float()
        p = torch.softmax(s * (Hd ** -0.5) + self.mask_add, dim=-1).to(self.dtype)
        o = torch.matmul(p, self.vc[l].to(self.dtype)).reshape(H * Hd)  # [KV, G, Hd] -> [H Hd]
        self.h.add_(linear(o, g.wo).float())

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _hot_fn(self, l: int) -> Callable[[], None]:
        def hot() -> None:
            if self.ops is not None:
                return self._hot_fused(l)
            g = self.gl[l]
            gu = linear(self.x.to(self.dtype), g.gate_up_rows()).view(g.n_hot, 2).float()
            s = self.act(gu[:, 0])
            a = s * gu[:, 1]
            self._hot_activity(l, s, a)
            self.h.add_(vecmat(a.to(self.dtype), g.hot_down).float())
        return hot

    def _hot_activity(self, l: int, s: torch.Tensor, a: torch.Tensor) -> None:
        """Count the activated hot neurons (the rule at t_l); in threshold mode with sparse_hot zero the
        others' a in place; with statistics on, add each slot's activity to hot_count (dynamic mode)."""
        v = (s if self.rule == "gate" else a).abs()
        on = v > self.thr_dev[l]
        if self.cold_mode == "threshold" and self.sparse_hot:
            a.mul_(on)
        n = on.sum()
        self.hot_active_dev[l] = n
        self.hot_active_sum[l] += n
        if self.stats_on:
            if self.cold_mode == "predictor":
                self.hot_count[l].add_(self.selector.hot_active(self, l, self.x))
            else:
                self.hot_count[l].add_((v > self.stat_thr_dev[l]).float())

    def _hot_fused(self, l: int) -> None:
        g, ops = self.gl[l], self.ops
        k = g.n_hot
        a, s = self.a_buf[:k], self.s_buf[:k]
        src = dict(x=self.x) if self.split(l) else dict(h=self.h, nw=g.ffn_norm, eps=self.cfg.norm_eps)
        if isinstance(g.hot_gu, QTensor):
            ops.qgate_up(g.hot_gu, a, s_out=s, **src)
            self._hot_activity(l, s, a)
            ops.qvecmat_add(a, g.hot_down, self.h)
            return
        ops.gate_up(g.hot_gu, a, s_out=s, **src)
        self._hot_activity(l, s, a)
        ops.vecmat_add(a, g.hot_down, self.h)

    def _head_dtype(self) -> torch.dtype:
        """The head's input dtype: the activations', except a float head tied to the embedding of a
        quantized model (float16 while activations are float32), whose dtype the input takes."""
        return self.head.dtype if isinstance(self.head, torch.Tensor) else self.dtype

    def _head(self) -> None:
        if self.split(self.L - 1):
            self._receive()
        if self.ops is not None:
            self._gemv(self.head, self.logits, h=self.h, nw=self.norm, eps=self.cfg.norm_eps)
        else:
            xn = rms_norm(self.h, self.norm.float(), self.cfg.norm_eps).to(self._head_dtype())
            self.logits.copy_(linear(xn, self.head).float())
        self.tok.copy_(self.logits.argmax().view(1))
        self.pos.add_(1)

    # ---- CPU side (decode) -------------------------------------------------------------------
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
        # activity flags: the bundled kernels write them always; the split layout's only for statistics
        act = mask if mask is not None else (self.active[l] if self.stats_on or c.gate is not None else None)
        # the statistics: the kernel counts active slots itself (exact mode computes all: counted below)
        counts = self.cold_count[l] if self.stats_on and self.cold_mode != "exact" else None
        r = self.kernel.run(c, x, self.cold_mode, rule=self.rule, mask=mask, thr=thr, active=act, out=out,
                            counts=counts)
        t3 = time.perf_counter()
        st.cpu_wait_s += t1 - t0
        st.prep_s += t2 - t1
        st.cpu_kernel_s += t3 - t2
        self.cpu_layer_s[l] += t3 - t2
        st.cpu_bytes += r.bytes_read
        st.cold_active += r.n_active
        self._cold_active_last[l] = r.n_active
        self.cold_active_sum[l] += r.n_active
        if self.stats_on and self.cold_mode == "exact":
            # exact mode computes every neuron; activity for the statistics is the rule at stat_thr
            self._exact_activity(l, x)
            self.cold_count[l] += self.active[l].numpy()
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
        g, u = c.gate_up_rows(x.view(1, -1) if c.quantized else x.view(1, -1).to(c.tensors()[0].dtype))
        s = self.act(g[0].float())
        v = s if self.rule == "gate" else s * u[0].float()
        self.active[l].copy_((v.abs() > float(self.stat_thr[l])).to(torch.uint8))

    # ---- running (decode) --------------------------------------------------------------------
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
        self.warm_kernel()
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

    def warm_kernel(self) -> None:
        """JIT-compile the cold kernel for this model's weights once, so no timed step includes it."""
        if getattr(self, "_kernel_warm", False):
            return
        self._kernel_warm = True
        bundled = [c for c in self.cl if c.n_cold and c.gate is not None]
        if bundled and self.kernel.backend == "numba":
            g = bundled[0].gate
            self.kernel.warm_up(g.fmt if isinstance(g, QTensor) else g.dtype)
            if not isinstance(g, QTensor):
                # one exact pass over every layer's real rows (~0.1 s per 10 GB): the threads' first touch
                # of the weights happens here, not in the first timed tokens
                x = torch.zeros(self.cfg.dim)
                for c in bundled:
                    self.kernel.run(c, x, "exact", rule=self.rule)

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
        """Forget the context (KV cache, position) and the decode totals."""
        self.pos.zero_()
        self.host_pos = 0
        self.h.zero_()
        self.y_dev.zero_()
        for k, v in zip(self.cache.k, self.cache.v):
            k.zero_()
            v.zero_()
        self.totals = Totals()
        self._sync_tag()

    def reset_stats(self) -> None:
        """Forget the measurements (report()) without touching the context."""
        self.measure.reset()
        self.hot_active_sum.zero_()
        self.cold_active_sum[:] = 0
        self.cpu_layer_s[:] = 0.0
        self.gpu_layer_s[:] = 0.0
        self.totals = Totals()

    @torch.inference_mode()
    def step(self, token: int | None = None) -> StepStats:
        """One decode step at position `host_pos`; token None feeds back the previous step's argmax (no
        host sync). The logits of the next token are in `self.logits`, its argmax in `self.tok`."""
        if self.host_pos >= self.max_len:
            raise InputError(f"the context is full ({self.max_len} tokens)", "raise --ctx-len, or shorten the prompt")
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
                    evs.append((self._seg_layer[seg], a, b))
                elif self.cuda:
                    self._run_segment(seg, v)
                else:  # the GPU side on a CPU: each op timed and charged to its layer
                    tf = ta
                    for f, l in zip(v, self._fn_layers[seg]):
                        f()
                        t_now = time.perf_counter()
                        self.gpu_layer_s[l] += t_now - tf
                        tf = t_now
                dt = time.perf_counter() - ta
                seg += 1
                st.launch_s += dt
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
        # GPU-side busy time: CUDA events when asked for; on a CPU the host time outside the cold kernel
        if self.cuda:
            for l, a, b in evs:
                self.gpu_layer_s[l] += a.elapsed_time(b) * 1e-3
                st.gpu_s += a.elapsed_time(b) * 1e-3
        else:
            st.gpu_s = st.seconds - st.cpu_kernel_s
        if self.stats_on:
            self.count_tokens += 1
        self.totals.add(st)
        return st

    # ---- batched forward (prefill, teacher-forced evaluation) ----------------------------------
    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        n = max_len or self.max_len
        if n > self.max_len:
            raise InputError(f"a {n}-token context is longer than this model's {self.max_len}",
                             "shorten the prompt or --max-new-tokens, or raise --ctx-len")
        return KVCache(self.cfg, batch, n, self.kv_dtype, self.device)

    def _ffn_batch(self, l: int, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        """FFN of layer l for x [N, D] (normed): hot neurons densely, cold ones exactly or per token by
        the mode's rule (threshold) or predictor; returns [N, D] in the weights' dtype."""
        g, c, st = self.gl[l], self.cl[l], self.measure
        measure = st.enabled
        m0 = st.gpu_mark() if measure else 0.0
        y = None
        thr = float(self.thr[l])
        if g.n_hot:
            k = g.n_hot
            gu = linear(x, g.gate_up_rows()).view(-1, k, 2)
            s = self.act(gu[..., 0])
            a = s * gu[..., 1]
            on = (s if self.rule == "gate" else a).abs() > thr
            if sparse and self.cold_mode == "threshold" and self.sparse_hot:
                a = a * on
            if measure:
                st.gpu_active(l, on.sum())
            y = vecmat(a, g.hot_down)
        m1 = st.gpu_mark() if measure else 0.0
        if c.n_cold:
            t0 = time.perf_counter()
            xc = x if not self.cuda else x.cpu()
            gt, u = c.gate_up_rows(xc)
            s = self.act(gt)
            a = s * u
            active = (s if self.rule == "gate" else a).abs() > thr
            if sparse and self.cold_mode == "threshold":
                a = a * active
            predicted = 0
            if sparse and self.cold_mode == "predictor":
                pm = self.selector.cold_mask_batch(self, l, x).to(xc.device)
                active = pm
                a = a * pm
                predicted = int(pm.sum())
            if measure:
                n_act = int(active.sum())
                rows = int(active.any(0).sum()) if sparse else c.n_cold
                st.cpu_active(l, n_act, rows, predicted)
            yc = a @ c.down_rows()
            if measure:
                st.cpu_interval(l, time.perf_counter() - t0)
            yc = yc if not self.cuda else yc.to(self.device, non_blocking=True)
            y = yc if y is None else y + yc
        if measure:
            st.gpu_interval(l, m0, m1)
        return y

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                last_only: bool = False, sparse: bool | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] float32 ([B, 1, V] with last_only), batched in plain torch.

        sparse: None = the model's prefill choice (`dense` computes every cold neuron); True computes every
        token as decoding does (each token its own active set: teacher-forced evaluation of the decode
        path). cache: a KVCache from new_cache() (None: a fresh one); `self.cache` is the decode cache."""
        cfg, st = self.cfg, self.measure
        B, T = tokens.shape
        if cache is None:
            cache = self.new_cache(B, start + T)
        if start + T > cache.max_len:
            raise InputError(f"a {start + T}-token context is longer than the cache's {cache.max_len}",
                             "shorten the prompt or --max-new-tokens, or raise --ctx-len")
        if sparse is None:
            sparse = self.prefill_mode == "sparse"
        sparse = bool(sparse) and self.cold_mode != "exact"
        t0 = st.begin(B * T, "prefill")
        h = F.embedding(tokens.to(self.device), self.embed).float()  # [B, T, D]
        for l, g in enumerate(self.gl):
            xa = rms_norm(h, g.attn_norm.float(), cfg.norm_eps).to(self.dtype)
            if self.quantized or cache.k[l].dtype != self.dtype:
                h = h + self._attention_batch(l, xa, start, cache).float()
            else:
                h = h + attention(cfg, g, xa, start, self.rope, cache.k[l], cache.v[l]).float()
            x = rms_norm(h, g.ffn_norm.float(), cfg.norm_eps).to(self.dtype).view(B * T, cfg.dim)
            h = h + self._ffn_batch(l, x, sparse).float().view(B, T, cfg.dim)
        if last_only:
            h = h[:, -1:]
        logits = linear(rms_norm(h, self.norm.float(), cfg.norm_eps).to(self._head_dtype()), self.head).float()
        st.end(t0)
        return logits

    def _attention_batch(self, l: int, x: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """dense.attention for quantized weights or a KV cache in another dtype than the activations:
        x [B, T, D] (normed) -> [B, T, D]; K/V are stored at start.. in the cache's dtype and read back as
        stored (what the decode step reads)."""
        cfg, g = self.cfg, self.gl[l]
        B, T, _ = x.shape
        H, KV, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = linear(x, g.wqkv, g.bqkv).split([H * Hd, KV * Hd, KV * Hd], dim=-1)
        q = self.rope.apply(q.view(B, T, H, Hd).transpose(1, 2), start)  # [B, H, T, Hd]
        k = self.rope.apply(k.view(B, T, KV, Hd).transpose(1, 2), start)
        S = start + T
        cache.k[l][:B, :, start:S] = k
        cache.v[l][:B, :, start:S] = v.view(B, T, KV, Hd).transpose(1, 2)
        keys, vals = cache.k[l][:B, :, :S].to(q.dtype), cache.v[l][:B, :, :S].to(q.dtype)
        mask = torch.arange(S, device=x.device)[None, :] <= (start + torch.arange(T, device=x.device))[:, None]
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=H != KV)
        return linear(o.transpose(1, 2).reshape(B, T, H * Hd), g.wo)

    __call__ = forward

    # ---- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Reset the context and compute the prompt in one batched forward into the decode cache; returns
        the logits of the token after it (float32 [V], on the GPU side). Capture graphs (capture()) before
        a prefill, not after: capturing resets the cache."""
        ids = [int(t) for t in ids]
        if not ids:
            raise InputError("the prompt is empty", "pass a prompt of at least one token")
        if len(ids) >= self.max_len:
            raise InputError(f"a {len(ids)}-token prompt does not fit the {self.max_len}-token context",
                             "shorten the prompt or raise --ctx-len")
        self.reset()
        logits = self.forward(torch.tensor([ids]), 0, self.cache, last_only=True)[0, -1]
        self.logits.copy_(logits)
        self.tok.copy_(self.logits.argmax().view(1))  # what step(None) feeds back
        self.pos.fill_(len(ids))
        self.host_pos = len(ids)
        return self.logits

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0, on_token: Callable[[int], bool | None] | None = None, keep_logits: bool = False,
                 top_p: float = 1.0, eos_ids: Sequence[int] | None = None):
        """Batched prefill, then decode steps (greedy at temperature 0, else top-p sampling) until an EOS id,
        max_new_tokens, or on_token returning True. Returns a hotcold.model.generate.Generation."""
        from hotcold.model.generate import Generation, sample

        if eos_ids is None:
            tok = getattr(self.bundle, "tokenizer", None)
            eos_ids = tok.eos_ids if tok is not None else self.cfg.eos_token_ids
        eos = set(int(e) for e in eos_ids)
        ids = [int(t) for t in prompt_ids]
        if len(ids) + max_new_tokens > self.max_len:
            raise InputError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the {self.max_len}-token context",
                             "lower --max-new-tokens or raise --ctx-len")
        gen = torch.Generator().manual_seed(seed)
        self.capture()
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        new: list[int] = []
        kept: list[torch.Tensor] = []
        stop = "length"
        while len(new) < max_new_tokens:
            if keep_logits:
                kept.append(logits.detach().float().cpu().clone())
            t = int(logits.argmax()) if temperature <= 0 else sample(logits, temperature, gen, top_p)
            new.append(t)
            if on_token and on_token(t):
                stop = "stopped"
                break
            if t in eos:
                stop = "eos"
                break
            if len(new) == max_new_tokens:
                break
            self.step(t)
            logits = self.logits
        t2 = time.perf_counter()
        return Generation(prompt_ids=ids, new_ids=new, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                          stop_reason=stop, logits=kept)

    # ---- online activation threshold ---------------------------------------------------------
    def hold_density(self, target: float, gain: float = 0.05) -> None:
        """Adjust t_l after every token so each layer's active fraction tracks `target` (threshold mode)."""
        if self.cold_mode != "threshold":
            raise InputError("holding a target density needs threshold mode", "use --cold-mode threshold")
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
        b = weight_bytes(self.head) + self.cfg.dim * es
        for g in self.gl:
            b += sum(weight_bytes(w) for w in (g.wqkv, g.wo, g.hot_gu, g.hot_down))
            b += 2 * self.kc[0].numel() * self.kc[0].element_size()
        if self.selector is not None and hasattr(self.selector, "bytes_per_token"):
            b += self.selector.bytes_per_token()
        return int(b)

    def memory(self) -> dict[str, int]:
        """Bytes held: GPU-side weights and KV cache, predictors, CPU-side cold weights."""
        tied = not isinstance(self.head, QTensor) and self.head.data_ptr() == self.embed.data_ptr()
        gpu = weight_bytes(self.embed) + (0 if tied else weight_bytes(self.head)) + weight_bytes(self.norm)
        gpu += sum(weight_bytes(t) for g in self.gl for t in g.tensors())
        kv = sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)
        pred = int(self.selector.gpu_bytes()) if self.selector is not None and hasattr(self.selector, "gpu_bytes") else 0
        cpu = sum(weight_bytes(t) for c in self.cl for t in c.tensors())
        return {"gpu_weights_and_kv": int(gpu + kv), "gpu_kv": int(kv), "gpu_predictors": pred, "cpu_cold": int(cpu)}

    def weight_format(self) -> str:
        """The quantized format of the weights (e.g. q4_g32), or the float dtype."""
        for g in self.gl:
            if isinstance(g.wqkv, QTensor):
                return g.wqkv.fmt.name
        return str(self.embed.dtype).replace("torch.", "")

    def hot_counts(self) -> list[np.ndarray]:
        return [c.cpu().numpy() for c in self.hot_count]

    def facts(self) -> dict[str, Any]:
        """What ran: device, kernels, graphs (the JSON of `hotcold run` and `bench` carries this)."""
        return {"gpu_side": str(self.device), "cpu_worker": "cpu", "gpu_kernels": self.gpu_kernels,
                "cpu_kernel": self.kernel.backend, "cpu_group": self.kernel.group,
                "cpu_schedule": "dynamic" if self.kernel.dynamic else "static",
                "cuda_graphs": self._graphs is not None, "graph_segments": self.n_segments if self._graphs else 0,
                "sends_in_graph": bool(self._graphs is not None and self.send_in_graph),
                "capture_error": self.capture_error, "tag_spins": self.tag_spins}

    def report(self) -> dict[str, Any]:
        """Measurements since construction (or reset_stats()): prefill (batched forwards) and decode
        (steps), per layer; memory; and the configuration."""
        n_hot = [g.n_hot for g in self.gl]
        s = self.measure.summary(n_hot, self.cfg.n_ff)
        pre = s["prefill"]
        tot = self.totals
        tok = max(tot.tokens, 1)
        hot = self.hot_active_sum.cpu().numpy()
        cold = self.cold_active_sum
        layers = []
        for l in range(self.L):
            a = float(hot[l] + cold[l])
            gpu_ms = 1e3 * self.gpu_layer_s[l] / tok if (not self.cuda or self.time_gpu) else None
            layers.append({"layer": l, "gpu_ms_per_token": gpu_ms, "cpu_ms_per_token": 1e3 * self.cpu_layer_s[l] / tok,
                           "gpu_share": float(hot[l]) / a if a else None,
                           "active_fraction": a / (tok * self.cfg.n_ff), "n_hot": n_hot[l]})
        a_all = float(hot.sum() + cold.sum())
        decode = {"tokens": tot.tokens, "seconds": tot.seconds,
                  "tokens_per_s": tot.tokens / tot.seconds if tot.seconds > 0 else None,
                  "ms_per_token": 1e3 * tot.seconds / tok,
                  "gpu_ms_per_token": 1e3 * tot.gpu_s / tok, "cpu_ms_per_token": 1e3 * tot.cpu_kernel_s / tok,
                  "cpu_wait_ms_per_token": 1e3 * tot.cpu_wait_s / tok, "launch_ms_per_token": 1e3 * tot.launch_s / tok,
                  "cpu_GBps": tot.cpu_bytes / tot.cpu_kernel_s / 1e9 if tot.cpu_kernel_s > 0 else None,
                  "gpu_share": float(hot.sum()) / a_all if a_all and tot.tokens else None,
                  "active_fraction": a_all / (tok * self.cfg.n_ff * self.L) if tot.tokens else None,
                  **_spread(tot.per_token_s), "layers": layers}
        mem = self.memory()
        gpu_b = mem["gpu_weights_and_kv"] - mem["gpu_kv"] + mem["gpu_predictors"]
        return {"bundle": None if self.bundle is None else str(self.bundle.path), "mode": self.cold_mode,
                "rule": self.rule if self.cold_mode != "exact" else None, "prefill": pre, "decode": decode,
                "prefill_mode": self.prefill_mode, "device": self.facts(),
                "dtype": str(self.dtype).replace("torch.", ""), "kernel": self.kernel.backend,
                "weights": self.weight_format(), "kv_dtype": str(self.kv_dtype).replace("torch.", ""),
                "n_hot": n_hot, "n_ff": self.cfg.n_ff,
                "memory": {**self.measure.memory(gpu_b, mem["cpu_cold"], shared=not self.cuda),
                           "held": mem, "account": None if self.account is None else self.account.to_json()}}
