"""Random-weight LLaMA models: tiny ones for tests, and real shapes (LLaMA-70B) for benchmarks.

Tensors are generated on demand, deterministically from (seed, tensor name), so an 80-layer 70B-shaped
model costs nothing until a layer is asked for, and the same layer is the same on every read.
Weights are labelled "random" in every manifest that records this source's description.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

import torch

from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource, global_names, layer_names


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


class RandomSource(WeightSource):
    """Deterministic random weights of any LLaMA shape (std 1/sqrt(fan_in), norms near 1)."""

    def __init__(self, config: ModelConfig, seed: int = 0, tokenizer=None):
        self.config = config
        self.seed = seed
        self._tokenizer = tokenizer
        self.description = f"random:{config.name}:seed={seed}"

    def _gen(self, name: str) -> torch.Generator:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:8], "little")
        return torch.Generator().manual_seed(h & ((1 << 63) - 1))

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _shape(self.config, name)
        g = self._gen(name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("norm", "attn_norm", "ffn_norm"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif leaf in ("bq", "bk", "bv"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif leaf in ("tok_embeddings", "output"):
            t = torch.randn(shape, generator=g)
            t *= 1.0 if leaf == "tok_embeddings" else shape[1] ** -0.5
        else:
            t = torch.randn(shape, generator=g) * shape[1] ** -0.5
        return t.to(dtype)

    def tokenizer(self):
        return self._tokenizer

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({"random": self.config.to_json(), "seed": self.seed},
                                         sort_keys=True).encode()).hexdigest()[:32]

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every tensor, in memory (only sensible for small shapes)."""
        return {n: self.get(n) for n in global_names(self.config) +
                [n for i in range(self.config.n_layers) for n in layer_names(self.config, i)]}
