"""The model configuration every stage shares, and the named shapes hotcold knows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hotcold.errors import InputError


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder (RMSNorm, RoPE, GQA attention, SwiGLU FFN)."""

    n_layers: int
    dim: int  # hidden size
    n_ff: int  # FFN intermediate size (neurons per layer)
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-style
    activation: str = "silu"  # silu (SwiGLU) or relu (ReGLU)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
                             "check the model's config")
        if self.activation not in ("silu", "relu"):
            raise InputError(f"activation {self.activation!r} is not supported", "use silu or relu")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def shape_key(self) -> dict[str, Any]:
        """The fields that fix every tensor's shape (what must match between a Profile and a model)."""
        return {k: getattr(self, k) for k in ("n_layers", "dim", "n_ff", "n_heads", "n_kv_heads",
                                              "vocab_size", "head_dim")}

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def n_params(self) -> int:
        """Parameter count (norms included, tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.n_ff
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim


# Named shapes: real architectures' exact shapes, usable with random weights ("synthetic").
SHAPES: dict[str, ModelConfig] = {
    "llama2-70b": ModelConfig(n_layers=80, dim=8192, n_ff=28672, n_heads=64, n_kv_heads=8, vocab_size=32000,
                              norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, bos_token_id=1,
                              eos_token_ids=(2,), name="llama2-70b"),
    "llama3-70b": ModelConfig(n_layers=80, dim=8192, n_ff=28672, n_heads=64, n_kv_heads=8, vocab_size=128256,
                              norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, bos_token_id=128000,
                              eos_token_ids=(128001, 128009), name="llama3-70b"),
    "smollm2-135m": ModelConfig(n_layers=30, dim=576, n_ff=1536, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,), name="smollm2-135m"),
    "tiny": ModelConfig(n_layers=4, dim=64, n_ff=256, n_heads=4, n_kv_heads=2, vocab_size=512, norm_eps=1e-5,
                        max_seq_len=512, bos_token_id=1, eos_token_ids=(2,), name="tiny"),
}
# Aliases: LLaMA-70B in this project means LLaMA-2-70B's shape unless said otherwise.
SHAPES["llama-70b"] = SHAPES["llama2-70b"]


def shape(name: str, **overrides: Any) -> ModelConfig:
    """A named shape, optionally with fields overridden (e.g. fewer layers for a benchmark)."""
    try:
        cfg = SHAPES[name]
    except KeyError:
        raise InputError(f"unknown shape {name!r}", f"use one of: {', '.join(sorted(SHAPES))}") from None
    return cfg.replace(**overrides) if overrides else cfg


__all__ = ["ModelConfig", "RopeScaling", "SHAPES", "shape"]
