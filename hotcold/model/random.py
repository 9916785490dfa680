"""Random-weight LLaMA models: tiny ones for tests, and real shapes (LLaMA-70B) for benchmarks.

Tensors are generated on demand, deterministically from (seed, tensor name), so an 80-layer 70B-shaped
model costs nothing until a layer is asked for, and the same layer is the same on every read.
Weights are labelled "random" in every manifest that records this source's description.

Random weights fire their FFN neurons almost uniformly, which makes every placement policy look alike.
A *workload* gives the model a skewed, per-layer firing distribution instead: gate row i of layer l is
scaled by s_li so that g = s·(w·x) with w·x ≈ N(0, 1) for an RMS-normed x passes the gate rule
|silu(g)| > GATE_T with probability f_li (s = silu⁻¹(GATE_T) / Φ⁻¹(1 − f)); its up row is scaled by
s_li / rms_i(s_li) so that magnitude rules |silu(g)·u| > t_l rank neurons the same way. `workload=synthetic` is a
per-layer power law (hotcold.workloads.frequencies.synthetic); `workload=PROFILE_DIR` maps a real model's
profile (e.g. SmolLM2 on MBPP) onto this shape by relative depth. Profiling such a model with any
activation rule recovers the skew (not the exact f: the rule and thresholds differ), so the real
profile → solve → export → run pipeline can be exercised at 70B shape.

torch is imported only where tensors are made (`get`, `gen_device="auto"`): a RandomSource's config,
description and fingerprint, which a synthetic profile for the solver carries, need no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource, global_names, layer_names

if TYPE_CHECKING:
    import torch


def _shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    leaf = name.rsplit(".", 1)[-1]
    D, F, Hd = cfg.dim, cfg.n_ff, cfg.head_dim
    return {
        "tok_embeddings": (cfg.vocab_size, D), "output": (cfg.vocab_size, D), "norm": (D,),
        "attn_norm": (D,), "ffn_norm": (D,),
        "wq": (cfg.n_heads * Hd, D), "wk": (cfg.n_kv_heads * Hd, D), "wv": (cfg.n_kv_heads * Hd, D),
        "bq": (cfg.n_heads * Hd,), "bk": (cfg.n_kv_heads * Hd,), "bv": (cfg.n_kv_heads * Hd,),
        "wo": (D, cfg.n_heads * Hd), "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F),
    }[leaf]


GATE_T = 1.0  # the gate rule's threshold the workload's gate scales are computed for
F_CAP = 0.45  # frequencies above this cannot be reached by scaling alone (silu(g) > t needs g > 0)


def _silu_inv(t: float) -> float:
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid / (1 + math.exp(-mid)) < t:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def gate_scales(f: np.ndarray, t: float = GATE_T) -> np.ndarray:
    """Row scale s_i so that P(silu(s_i z) > t) = f_i for z ~ N(0, 1) (f capped at F_CAP)."""
    g_t = _silu_inv(t)
    inv = NormalDist().inv_cdf
    z = np.array([inv(1 - v) for v in np.clip(np.asarray(f, dtype=np.float64), 1e-7, F_CAP).ravel()])
    return (g_t / z).reshape(np.shape(f))


class RandomSource(WeightSource):
    """Deterministic random weights of any LLaMA shape (std 1/sqrt(fan_in), norms near 1).

    `workload` ([n_layers, n_ff] firing frequencies) scales the gate rows (module docstring);
    `workload_name` names it in the description and fingerprint.
    """

    def __init__(self, config: ModelConfig, seed: int = 0, tokenizer=None, workload: np.ndarray | None = None,
                 workload_name: str = "", gen_device: str = "cpu"):
        if gen_device == "auto":
            import torch

            gen_device = "cuda" if torch.cuda.is_available() else "cpu"
        if gen_device not in ("cpu", "cuda"):
            raise ValueError(f"gen_device must be cpu, cuda or auto, got {gen_device!r}")
        # Generating a 70B layer on the CPU takes ~1 min; on a GPU milliseconds. The two streams differ,
        # so the generator's device is part of the model's identity (description and fingerprint).
        self.gen_device = gen_device
        self.config = config
        self.seed = seed
        self._tokenizer = tokenizer
        self.workload = None
        self.workload_name = workload_name
        self.description = f"random:{config.name}:seed={seed}" + (",gen=cuda" if gen_device == "cuda" else "")
        if workload is not None:
            w = np.asarray(workload, dtype=np.float64)
            if w.shape != (config.n_layers, config.n_ff):
                raise ValueError(f"workload shape {w.shape} != (n_layers, n_ff) = {(config.n_layers, config.n_ff)}")
            self.workload = w
            self.description += f",workload={workload_name or 'custom'}"
        if tokenizer is not None and getattr(tokenizer, "description", ""):
            self.description += f",tokenizer={tokenizer.description}"

    @cached_property
    def _scales(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, the workload's gate and up row scales (made on the first tensor read)."""
        import torch

        scales = []
        for l in range(self.config.n_layers):
            sc = torch.from_numpy(gate_scales(self.workload[l])).float()
            # up rows scaled alike (normalised to rms 1) so |silu(g)·u| rules track f too, not only |silu(g)|
            scales.append({"w_gate": sc, "w_up": sc / sc.square().mean().sqrt()})
        return scales

    def _gen(self, name: str) -> torch.Generator:
        import torch

        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:8], "little")
        return torch.Generator(device=self.gen_device).manual_seed(h & ((1 << 63) - 1))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        dtype = torch.float32 if dtype is None else dtype
        shape = _shape(self.config, name)
        g = self._gen(name)
        dev = self.gen_device
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("norm", "attn_norm", "ffn_norm"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=dev)
        elif leaf in ("bq", "bk", "bv"):
            t = 0.02 * torch.randn(shape, generator=g, device=dev)
        elif leaf in ("tok_embeddings", "output"):
            t = torch.randn(shape, generator=g, device=dev)
            t *= 1.0 if leaf == "tok_embeddings" else shape[1] ** -0.5
        else:
            t = torch.randn(shape, generator=g, device=dev) * shape[1] ** -0.5
            if leaf in ("w_gate", "w_up") and self.workload is not None:
                t *= self._scales[int(name.split(".")[1])][leaf].to(dev)[:, None]
        return t.to(dtype).cpu()

    def tokenizer(self):
        return self._tokenizer

    @cached_property
    def fingerprint(self) -> str:
        key = {"random": self.config.to_json(), "seed": self.seed}
        if self.gen_device != "cpu":
            key["gen"] = self.gen_device
        if self.workload is not None:
            key["workload"] = hashlib.sha256(np.ascontiguousarray(self.workload).tobytes()).hexdigest()
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every tensor, in memory (only sensible for small shapes)."""
        return {n: self.get(n) for n in global_names(self.config) +
                [n for i in range(self.config.n_layers) for n in layer_names(self.config, i)]}
