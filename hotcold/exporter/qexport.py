"""Quantized matrices for the exporter: each large matrix of a WeightSource in one hotcold.quant format,
with where its values came from (hotcold.quant's provenance: kept / quantized / requantized).

From a GGUF file the source's own quantized bytes are converted (`quant.from_gguf`: kept exactly where
the layout allows, requantized otherwise: the down projection stored by neuron always is); from any other
source (float weights: safetensors, random) the float matrix is quantized.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hotcold.quant import QUANTIZED, QFormat, QTensor, from_gguf_tensor, quantize


class QuantSource:
    """`matrix(name, w)` -> (QTensor, provenance) for our tensor `name` whose float value is `w` [rows, cols]
    (transpose: store w.T, the down projection by neuron)."""

    def __init__(self, src: Any, fmt: QFormat):
        self.src, self.fmt = src, fmt
        from hotcold.model.gguf_loader import GGUFSource

        self.gguf = isinstance(src, GGUFSource)

    def matrix(self, name: str, w: torch.Tensor | None, transpose: bool = False) -> tuple[QTensor, str]:
        f = self.fmt
        if self.gguf:
            from hotcold.model.gguf_loader import PERMUTED_QK, gguf_name, unpermute_qk

            t = self.src.tensors[gguf_name(name)]
            qt, how = from_gguf_tensor(t, f, transpose=transpose)
            leaf = name.rsplit(".", 1)[-1]
            if self.src.arch in PERMUTED_QK and leaf in ("wq", "wk"):
                # llama.cpp's Q/K row permutation is a row gather: undoing it keeps the values
                heads = self.src.config.n_heads if leaf == "wq" else self.src.config.n_kv_heads
                qt = qt.take_rows(unpermute_qk(np.arange(qt.shape[0]), heads))
            return qt, how
        m = w.t() if transpose else w
        return quantize(m.contiguous(), f.bits, f.group, f.asym, name=name), QUANTIZED
