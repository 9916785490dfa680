"""One internal representation for every model source: a config plus lazily loaded, named tensors.

Our tensor names (shapes as stored: [out_features, in_features], like torch.nn.Linear):

    tok_embeddings              [vocab, dim]
    layers.{i}.attn_norm        [dim]
    layers.{i}.wq               [n_heads * head_dim, dim]     (rows in HF order: RoPE halves, not interleaved)
    layers.{i}.wk / wv          [n_kv_heads * head_dim, dim]
    layers.{i}.bq / bk / bv     [rows]                        (Qwen2-style biases, optional)
    layers.{i}.wo               [dim, n_heads * head_dim]
    layers.{i}.ffn_norm         [dim]
    layers.{i}.w_gate / w_up    [n_ff, dim]                   (row i = neuron i)
    layers.{i}.w_down           [dim, n_ff]                   (column i = neuron i)
    norm                        [dim]
    output                      [vocab, dim]                  (absent when embeddings are tied)

Each source maps external names to these through one explicit table (see gguf_loader / hf_loader).

torch is imported inside the methods that make tensors: a source's config and fingerprint (all the
solver reads, e.g. of a random model named by a synthetic profile) need no torch. `dtype=None` means
float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from hotcold.model.config import ModelConfig

if TYPE_CHECKING:
    import torch

    from hotcold.model.tokenizer import Tokenizer

LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
BIAS_TENSORS = ("bq", "bk", "bv")


def _float32_if_none(dtype: torch.dtype | None) -> torch.dtype:
    import torch

    return torch.float32 if dtype is None else dtype


def layer_names(cfg: ModelConfig, i: int) -> list[str]:
    names = [f"layers.{i}.{t}" for t in LAYER_TENSORS]
    if cfg.qkv_bias:
        names += [f"layers.{i}.{t}" for t in BIAS_TENSORS]
    return names


def global_names(cfg: ModelConfig) -> list[str]:
    return ["tok_embeddings", "norm"] + ([] if cfg.tie_embeddings else ["output"])


class WeightSource(ABC):
    """A model: its config, its tokenizer (if it has one) and its tensors, read on demand.

    Nothing is read until asked for, so a 70B model can be walked one layer at a time.
    """

    config: ModelConfig
    description: str  # where it came from, for messages and manifests

    @abstractmethod
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` (our naming), dequantized / converted to `dtype` (None: float32)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A stable id of these exact weights (cheap: never reads all of a large file)."""

    def tokenizer(self) -> Tokenizer | None:
        return None

    def names(self) -> list[str]:
        return global_names(self.config) + [n for i in range(self.config.n_layers)
                                            for n in layer_names(self.config, i)]

    def layer(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors of layer i, keyed by the short name (wq, w_gate, ...)."""
        dtype = _float32_if_none(dtype)
        return {n.split(".", 2)[2]: self.get(n, dtype) for n in layer_names(self.config, i)}

    def embedding(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.get("tok_embeddings", _float32_if_none(dtype))

    def lm_head(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.get("tok_embeddings" if self.config.tie_embeddings else "output", _float32_if_none(dtype))

    def manifest_entry(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "source": self.description, "config": self.config.to_json()}


class TensorDictSource(WeightSource):
    """Weights already in memory (random test models, synthetic shapes, converted checkpoints)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], description: str,
                 tokenizer: Tokenizer | None = None):
        self.config = config
        self.tensors = tensors
        self.description = description
        self._tokenizer = tokenizer

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensors[name].to(_float32_if_none(dtype))

    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @cached_property
    def fingerprint(self) -> str:
        import hashlib

        import torch

        h = hashlib.sha256(repr(sorted(self.config.to_json().items())).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().contiguous().to(torch.float32).view(-1)
            h.update(name.encode())
            h.update(t[:4096].numpy().tobytes())
            h.update(str(float(t.double().sum())).encode())
        return h.hexdigest()[:32]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)
