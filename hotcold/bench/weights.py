"""The benchmark's model: random weights generated on the device, GPU budgets scaled to N layers, and a
HybridModel for given hot/cold sets over those weights.

Gate rows are scaled so that, under the gate rule |silu(g_i)| > t with t = GATE_T, neuron i fires with
about the workload's frequency f_i (g_i = w_i·x is close to N(0, s_i² · mean(ffn_norm²)) for rms-normed
x, so s_i = silu⁻¹(t) / Φ⁻¹(1 − f_i), with f capped at F_CAP); the `threshold` run checks that.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from hotcold.memory import dense_bytes
from hotcold.model.config import ModelConfig
# the gate-row scaling that gives neuron i its workload frequency is the random model's (one definition)
from hotcold.model.random import gate_scales

if TYPE_CHECKING:
    from hotcold.bench.harness import BenchContext
    from hotcold.runtime.model import HybridModel


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


def generate(ctx: BenchContext) -> None:
    """Generate the weights for the matched workload's frequencies into ctx (glob, layers), timed."""
    from hotcold.bench.runs import _sync

    t0 = time.perf_counter()
    ctx.glob, ctx.layers = generate_weights(ctx.cfg, ctx.f_match, ctx.dev, ctx.dtype, ctx.o.seed)
    _sync(ctx.dev)
    ctx.res["weight_generation_s"] = time.perf_counter() - t0
    ctx.log(f"weights generated in {ctx.res['weight_generation_s']:.1f} s")


def nonlayer_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of the tensors outside the decoder layers (embedding, LM head, final norm)."""
    d = dense_bytes(cfg, dtype)
    return d.embedding + d.lm_head + d.final_norm


def scaled_budget(cfg_n: ModelConfig, full_layers: int, budget_full: int, dtype: str) -> int:
    """A full-depth GPU budget scaled to cfg_n's N layers: (B − non-layer) · N / L_full + non-layer."""
    nl = nonlayer_bytes(cfg_n, dtype)
    return int((budget_full - nl) * cfg_n.n_layers / full_layers + nl)


def build_model(ctx: BenchContext, hot_ids: list[np.ndarray], cold_ids: list[np.ndarray], mode: str,
                selector=None, thresholds=None) -> HybridModel:
    """A HybridModel over ctx's generated weights with these hot and cold neuron ids per layer, built with
    the options' GPU kernels and CPU kernel settings."""
    from hotcold.runtime.build import split_layer
    from hotcold.runtime.model import HybridModel

    cfg, o = ctx.cfg, ctx.o
    gls, cls = [], []
    for l in range(cfg.n_layers):
        t = dict(ctx.layers[l])
        t["cold_ids"] = cold_ids[l]
        g, c = split_layer(t, hot_ids[l], cfg.n_ff, ctx.dev, ctx.dtype)
        gls.append(g)
        cls.append(c)
    return HybridModel(cfg, ctx.glob["tok_embeddings"], ctx.glob["norm"], ctx.glob["output"], gls, cls,
                       cold_mode=mode, max_len=o.max_len, selector=selector, thresholds=thresholds,
                       gpu_kernels=o.gpu_kernels, cpu_backend=o.cpu_backend, cpu_threads=o.cpu_threads,
                       cpu_group=o.cpu_group, cpu_dynamic=o.cpu_dynamic)
