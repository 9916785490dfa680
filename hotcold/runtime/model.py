"""The hybrid model: a Bundle run as a GPU side (attention, norms, embeddings, LM head, hot neurons) and a
CPU worker (cold neurons), design.md §5.

Per layer:
    GPU side   h += attention(norm(h));  x = ffn_norm(h)
               [predictor mode: predictor(x) -> which cold neurons to compute]
               hand x (and the predicted index list) to the CPU worker
               y = hot neurons of x, densely (queued on the GPU: on CUDA it runs while the CPU works)
    CPU worker y_cold = cold neurons of x: every one (exact), those whose gate passes t_l (threshold),
               or those the predictor chose (predictor; t_l applied to them too)
    GPU side   h += y + y_cold

The GPU side runs on `cuda` when present, else on the CPU through the same code. Attention, RMSNorm,
RoPE and the KV cache are the dense reference's (hotcold/model/dense.py), so `exact` mode gives the
dense model's logits. The model satisfies the protocol of hotcold.model.generate (`new_cache`,
`forward(tokens, start, cache, last_only)`), so generation is shared with the dense model.

Seams kept for later work (issue 6): the CPU worker is an object with `submit`/`result` (a thread or
process worker with overlap can replace the inline one), the CPU kernel is replaceable (kernels.py),
and each layer's hot/cold split lives in `GpuLayer` / `ColdLayer` objects plus the bundle's index maps,
which a migration step can rewrite between tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hotcold.errors import InputError
from hotcold.model.dense import KVCache, LayerWeights, Rope, attention, gemv_layout, rms_norm
from hotcold.runtime.bundle import Bundle
from hotcold.runtime.kernels import _ZERO, csr, get_kernel
from hotcold.runtime.stats import Measurements

MODES = ("exact", "threshold", "predictor")
PREFILL = ("dense", "sparse")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", "use --device auto or cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}", "use auto, cuda or cpu")
    return torch.device(device)


def fits_in_memory(tensors: dict[str, torch.Tensor], share: float = 0.5) -> bool:
    """Whether these tensors take at most `share` of the memory available now (Linux MemAvailable; False
    where it cannot be read)."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return need <= share * avail


@dataclass
class GpuLayer:
    lw: LayerWeights  # attention + norms, and the hot neurons as a small dense FFN (w_gate_up [2k, D], w_down [D, k])
    k: int
    threshold: float | None


@dataclass
class ColdLayer:
    """One layer's cold neurons in the bundle's CPU layout: bundled (gate, up_down) or split (gate_up, down)."""

    threshold: float | None
    gate: torch.Tensor | None = None  # bundled: [c, D]
    up_down: torch.Tensor | None = None  # bundled: [c, 2D], row j = [up_j | down_j]
    gate_up: torch.Tensor | None = None  # split: [2c, D] (a view of the stored [D, 2c]), gate rows then up rows
    down: torch.Tensor | None = None  # split: [c, D], row j = down_j

    c: int = 0  # cold neurons (set from the tensors)

    def __post_init__(self):
        self.c = int(self.gate.shape[0] if self.gate is not None else self.down.shape[0])


@dataclass
class _Job:
    layer: int
    x: torch.Tensor
    sparse: bool
    predicted: torch.Tensor | None


class CpuWorker:
    """Computes cold neurons on the CPU. The inline worker does the work in `result()`, i.e. after the
    caller has queued the GPU side's hot-neuron work (on CUDA that work runs meanwhile)."""

    def __init__(self, layers: list[ColdLayer], activation: str, rule: str | None, kernel: Any,
                 stats: Measurements, predictor_mode: bool):
        self.layers = layers
        self.act = F.silu if activation == "silu" else F.relu
        self.rule = rule or "product"
        self.kernel = kernel
        self.stats = stats
        self.predictor_mode = predictor_mode

    def submit(self, layer: int, x: torch.Tensor, sparse: bool, predicted: torch.Tensor | None = None) -> _Job:
        return _Job(layer, x, sparse, predicted)

    def result(self, job: _Job) -> torch.Tensor | None:
        cl = self.layers[job.layer]
        if cl.c == 0:
            return None
        t0 = time.perf_counter()
        if not job.sparse:
            y = self._exact(job.layer, cl, job.x)
        elif self.predictor_mode:
            y = self._predicted(job.layer, cl, job.x, job.predicted)
        else:
            y = self._threshold(job.layer, cl, job.x)
        if self.stats.enabled:
            self.stats.cpu_interval(job.layer, time.perf_counter() - t0)
        return y

    def _count(self, layer: int, active: int, rows: int, predicted: int = 0) -> None:
        if self.stats.enabled:
            self.stats.cpu_active(layer, active, rows, predicted)

    def _gate_up(self, cl: ColdLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """act(gate x) and up x of every cold neuron, [N, c] each."""
        if cl.gate_up is not None:
            g, u = F.linear(x, cl.gate_up).chunk(2, dim=-1)
            return self.act(g), u
        return self.act(F.linear(x, cl.gate)), F.linear(x, cl.up_down[:, : x.shape[-1]])

    def _down_rows(self, cl: ColdLayer, D: int) -> torch.Tensor:
        return cl.down if cl.down is not None else cl.up_down[:, D:]

    def _exact(self, layer: int, cl: ColdLayer, x: torch.Tensor) -> torch.Tensor:
        ga, u = self._gate_up(cl, x)
        a = ga * u
        y = F.linear(a, self._down_rows(cl, x.shape[-1]).t())
        if self.stats.enabled:
            active = int(((ga if self.rule == "gate" else a).abs() > (cl.threshold or 0.0)).sum())
            self._count(layer, active, cl.c * x.shape[0])
        return y

    def _threshold(self, layer: int, cl: ColdLayer, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        if self.rule == "gate" and cl.up_down is not None:
            # CATS on the bundled layout: every gate row, then one gathered [up | down] block
            ga = self.act(F.linear(x, cl.gate))
            mask = ga.abs() > cl.threshold
            if x.shape[0] == 1:
                idx = mask[0].nonzero().squeeze(1)
                coef = ga.index_select(1, idx)
            else:
                idx = mask.any(0).nonzero().squeeze(1)
                coef = (ga * mask).index_select(1, idx)
            self._count(layer, int(mask.sum()) if x.shape[0] > 1 else int(idx.numel()), int(idx.numel()))
            return self.kernel.up_down(x, coef, idx, cl.up_down)
        if self.rule == "product" and x.shape[0] == 1:
            # decoding, the hot path: one gemv for gate and up, activation and product in place, then
            # the kernel keeps |a| > t and sums those neurons' down rows in place
            if cl.gate_up is not None:
                g, u = F.linear(x, cl.gate_up)[0].chunk(2)
            else:
                g, u = F.linear(x, cl.gate)[0], F.linear(x, cl.up_down[:, :D])[0]
            y, m = self.kernel.threshold_down(self.act(g, inplace=True).mul_(u), cl.threshold, self._down_rows(cl, D))
            if self.stats.enabled:
                self._count(layer, m, m)
            return y
        ga, u = self._gate_up(cl, x)
        a = ga * u
        w, idx, off = csr(a, (ga if self.rule == "gate" else a).abs() > cl.threshold)
        self._count(layer, int(idx.numel()), int(idx.numel()))
        return self.kernel.down(w, idx, off, self._down_rows(cl, D))

    def _predicted(self, layer: int, cl: ColdLayer, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """pred [N, c] bool from the predictor: only those neurons' rows are read; t_l applies to them too."""
        D = x.shape[-1]
        cand = pred.any(0).nonzero().squeeze(1) if pred.shape[0] > 1 else pred[0].nonzero().squeeze(1)
        pm = pred.index_select(1, cand)  # [N, m]
        if cl.gate_up is not None:
            g, u = F.linear(x, cl.gate_up.index_select(0, torch.cat([cand, cand + cl.c]))).chunk(2, dim=-1)
            ga = self.act(g)
        else:
            ga = self.act(F.linear(x, cl.gate.index_select(0, cand)))
            if self.rule == "gate":
                mask = (ga.abs() > cl.threshold) & pm
                coef = ga * mask
                if x.shape[0] == 1:
                    pos = mask[0].nonzero().squeeze(1)
                else:
                    pos = mask.any(0).nonzero().squeeze(1)
                idx = cand.index_select(0, pos)
                self._count(layer, int(mask.sum()), int(idx.numel()), int(pm.sum()))
                return self.kernel.up_down(x, coef.index_select(1, pos), idx, cl.up_down)
            u = F.linear(x, cl.up_down.index_select(0, cand)[:, :D])
        a = ga * u
        mask = ((ga if self.rule == "gate" else a).abs() > cl.threshold) & pm
        w, pos, off = csr(a, mask)
        self._count(layer, int(pos.numel()), int(pos.numel()), int(pm.sum()))
        return self.kernel.down(w, cand.index_select(0, pos), off, self._down_rows(cl, D))


class HybridModel:
    """A Bundle, ready to generate. See the module docstring."""

    def __init__(self, bundle: Bundle, mode: str = "threshold", device: str = "auto",
                 gpu_budget: int | str | None = None, max_len: int | None = None, prefill: str = "dense",
                 thresholds: float | Sequence[float] | None = None, kernel: str | Any = None,
                 predictor_backend: str = "torch", gemv: bool | None = None, measure: bool = True,
                 resident: bool | None = None):
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}", f"use one of: {', '.join(MODES)}")
        if prefill not in PREFILL:
            raise InputError(f"unknown prefill {prefill!r}", f"use one of: {', '.join(PREFILL)}")
        self.bundle = bundle
        # resident: the CPU worker's weights copied from the bundle's memory map into process memory at load
        # (as the dense model holds its weights): streaming them is faster than streaming page-cache
        # mappings on the dev VM (docs/runtime.md); False keeps them mapped (no copy, pages read on demand);
        # None: copy when they fit in half of the memory available now (a bundle larger than RAM stays mapped)
        self.resident = fits_in_memory(bundle.cpu) if resident is None else resident
        self.cfg = cfg = bundle.config
        self.mode = mode
        self.prefill = prefill
        self.device = resolve_device(device)
        self.dtype = TORCH_DTYPES[bundle.dtype]
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.account = bundle.check_budget(gpu_budget, self.max_len, mode)
        if thresholds is not None:
            from hotcold.exporter.thresholds import given_thresholds

            ts: list[float] | None = given_thresholds(thresholds, cfg.n_layers)
        else:
            ts = bundle.thresholds
        if mode != "exact" and ts is None:
            raise InputError(f"bundle {bundle.path} has no activation thresholds, which --mode {mode} needs",
                             "re-export with --profile and --sparsity (or --threshold), pass --threshold, or use --mode exact")
        self.thresholds = ts
        self.rule = bundle.rule or "product"
        self.stats = Measurements(cfg.n_layers, self.device, enabled=measure)
        self.kernel = get_kernel(kernel)
        on_cpu = self.device.type == "cpu"
        self.gemv = on_cpu if gemv is None else gemv
        dev = self.device

        def put(t: torch.Tensor) -> torch.Tensor:
            return t if on_cpu else t.to(dev)

        def cpu(name: str) -> torch.Tensor:
            """A CPU-worker tensor: the bundle's mapping, or a copy in process memory (`resident`)."""
            t = bundle.cpu[name]
            return t.clone() if self.resident else t

        g = bundle.gpu
        self.embed = put(g["tok_embeddings"])
        self.norm = put(g["norm"])
        head = self.embed if cfg.tie_embeddings else put(g["output"])
        self.lm_head = gemv_layout(head) if self.gemv and on_cpu else head
        self.gpu_layers: list[GpuLayer] = []
        self.cold_layers: list[ColdLayer] = []
        n_hot = bundle.n_hot
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            lw = LayerWeights(attn_norm=put(g[p + "attn_norm"]), wqkv=put(g[p + "wqkv"]),
                              bqkv=put(g[p + "bqkv"]) if cfg.qkv_bias else None, wo=put(g[p + "wo"]),
                              ffn_norm=put(g[p + "ffn_norm"]), w_gate_up=put(g[p + "hot_gate_up"]),
                              w_down=put(g[p + "hot_down"]).t())
            if self.gemv and on_cpu:
                lw = lw.for_decode()
            t = None if ts is None else float(ts[i])
            self.gpu_layers.append(GpuLayer(lw=lw, k=n_hot[i], threshold=t))
            if bundle.cpu_layout == "split":
                cl = ColdLayer(threshold=t, gate_up=cpu(p + "cold_gate_up_t").t(), down=cpu(p + "cold_down"))
            else:
                cl = ColdLayer(threshold=t, gate=cpu(p + "cold_gate"), up_down=cpu(p + "cold_up_down"))
            self.cold_layers.append(cl)
        self.predictors = None
        if mode == "predictor":
            from hotcold.runtime.predictor import Predictors

            self.predictors = Predictors(bundle, dev, predictor_backend)
        self.worker = CpuWorker(self.cold_layers, cfg.activation, self.rule, self.kernel, self.stats,
                                predictor_mode=mode == "predictor")
        self.act = F.silu if cfg.activation == "silu" else F.relu
        self.rope = Rope(cfg, self.max_len, dev)

    # ---- the generate() protocol ----------------------------------------------------------------
    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        n = max_len or self.max_len
        if n > self.max_len:
            raise InputError(f"a {n}-token context is longer than this model's {self.max_len}",
                             "shorten the prompt or --max-new-tokens, or raise --max-len")
        return KVCache(self.cfg, batch, n, self.dtype, self.device)

    def _hot(self, i: int, gl: GpuLayer, x: torch.Tensor) -> torch.Tensor | None:
        if gl.k == 0:
            return None
        g, u = F.linear(x, gl.lw.w_gate_up).chunk(2, dim=-1)
        ga = self.act(g)
        a = ga * u
        if self.stats.enabled:
            m = (ga if self.rule == "gate" else a).abs() > (gl.threshold or 0.0)
            self.stats.gpu_active(i, m.sum())
        return F.linear(a, gl.lw.w_down)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                last_only: bool = False, sparse: bool | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] float32 ([B, 1, V] with last_only).

        sparse: None = the mode's choice (one token: sparse unless exact; several: per `prefill`);
        True computes every token of a multi-token forward as decoding would (each token its own active
        set: teacher-forced evaluation of the decode path with a dense prefill before it)."""
        cfg, st = self.cfg, self.stats
        B, T = tokens.shape
        if cache is None:
            cache = self.new_cache(B, start + T)
        if sparse is None:
            sparse = T == 1 or self.prefill == "sparse"
        sparse = sparse and self.mode != "exact"
        t0 = st.begin(B * T, "decode" if T == 1 else "prefill")
        on_cpu = self.device.type == "cpu"
        measure, worker, preds, cold = st.enabled, self.worker, self.predictors, self.cold_layers
        h = F.embedding(tokens.to(self.device), self.embed)  # [B, T, D]
        for i, gl in enumerate(self.gpu_layers):
            m0 = st.gpu_mark() if measure else 0.0
            h = h + attention(cfg, gl.lw, rms_norm(h, gl.lw.attn_norm, cfg.norm_eps), start, self.rope,
                              cache.k[i], cache.v[i])
            x = rms_norm(h, gl.lw.ffn_norm, cfg.norm_eps).view(B * T, cfg.dim)
            pred = None
            if sparse and preds is not None and cold[i].c:
                pred = preds.cold_active(i, x)
                pred = pred if on_cpu else pred.cpu()
            job = worker.submit(i, x if on_cpu else x.cpu(), sparse, pred)
            y = self._hot(i, gl, x)  # queued on the GPU side (asynchronous on CUDA)
            m1 = st.gpu_mark() if measure else 0.0
            y_cold = worker.result(job)  # the CPU worker's partial sum
            m2 = st.gpu_mark() if measure else 0.0
            if y_cold is not None:
                y_cold = y_cold if on_cpu else y_cold.to(self.device, non_blocking=True)
                y = y_cold if y is None else y + y_cold
            h = h + y.view(B, T, cfg.dim)
            if measure:
                m3 = st.gpu_mark()
                st.gpu_interval(i, m0, m1)
                st.gpu_interval(i, m2, m3)
        if last_only:
            h = h[:, -1:]
        logits = F.linear(rms_norm(h, self.norm, cfg.norm_eps), self.lm_head).float()
        st.end(t0)
        return logits

    __call__ = forward

    # ---- conveniences -----------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0, on_token=None, keep_logits: bool = False, top_p: float = 1.0):
        """hotcold.model.generate.generate on this model, stopping at the bundle tokenizer's EOS ids (or when
        on_token returns True)."""
        from hotcold.model.generate import generate

        eos = self.bundle.tokenizer.eos_ids if self.bundle.tokenizer is not None else self.cfg.eos_token_ids
        return generate(self, prompt_ids, max_new_tokens, temperature, seed, eos, on_token, keep_logits, top_p=top_p)

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of weights the GPU side holds, bytes the CPU worker holds)."""
        gpu = sum(t.numel() * t.element_size() for t in self.bundle.gpu.values())
        if self.predictors is not None:
            gpu += int(self.account.gpu.get("predictors", 0))
        cpu = sum(t.numel() * t.element_size() for t in self.bundle.cpu.values())
        return gpu, cpu

    def report(self) -> dict[str, Any]:
        """Measurements since construction (or the last `stats.reset()`), memory, and the configuration."""
        gpu_b, cpu_b = self.weight_bytes()
        return {"bundle": str(self.bundle.path), "mode": self.mode, "resident": self.resident, "rule": self.rule if self.mode != "exact" else None,
                "prefill": self.prefill, "device": {"gpu_side": str(self.device), "cpu_worker": "cpu"},
                "dtype": self.bundle.dtype, "kernel": getattr(self.kernel, "name", type(self.kernel).__name__),
                "n_hot": self.bundle.n_hot, "n_ff": self.cfg.n_ff,
                "memory": {**self.stats.memory(gpu_b, cpu_b, shared=self.device.type == "cpu"),
                           "account": self.account.to_json()},
                **self.stats.summary(self.bundle.n_hot, self.cfg.n_ff)}


def load(path: str, mode: str = "threshold", device: str = "auto", gpu_budget: int | str | None = None,
         verify: str = "full", expect_fingerprint: str | None = None, **kw: Any) -> HybridModel:
    """Load and verify a Bundle and build the hybrid model (see HybridModel for the keyword options)."""
    return HybridModel(Bundle.load(path, verify=verify, expect_fingerprint=expect_fingerprint), mode=mode,
                       device=device, gpu_budget=gpu_budget, **kw)
