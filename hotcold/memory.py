"""The one memory account: bytes of every tensor the runtime holds, by dtype (style.md: accounting in one place).

The solver budgets with these functions, the exporter sizes what it writes with them, and the runtime
re-checks a Bundle against them at load time. Nothing else in hotcold computes tensor bytes.

What the runtime holds for a LLaMA-family model (design.md §2, §5):

    GPU side   attention weights (q, k, v, o; q/k/v biases for Qwen2-style models) and the two norms of
               every layer, token embeddings, LM head (absent when tied), final norm, the KV cache for
               `ctx_len` tokens, predictors (cold mode `predictor`), activation buffers, and each
               layer's hot FFN neurons (gate row, up row, down row: `dim` elements each)
    CPU side   each layer's cold FFN neurons (the same three rows), activation buffers

A neuron's three rows have the same size (`neuron_bytes`), so "n hot neurons" is all the solver needs to
know about FFN memory. Norms and biases are stored in the weight dtype when it is a float type, and in
float32 for quantized weights (as GGUF does); the KV cache in the weight dtype, float16 for quantized
weights; the token embedding in the weight dtype, float16 for quantized weights (a row lookup, read one
row per token: quantizing it would save GPU memory but no time; the untied LM head is quantized).

Quantized dtypes are hotcold.quant's group-wise formats, named as `QFormat.name` (`q4_g32`, `q8_g32`,
`q4a_g32`, `q4_g64`, ...; `q4`, `q8`, `q4a`, `q8a` and GGUF's `q4_0`, `q8_0`, `q4_1` are aliases of the
group-32 ones). Their bytes come from `QFormat.row_bytes` (codes + float16 scales, + offsets when
asymmetric): `q4_0`'s 32-element blocks are 18 bytes, `q8_0`'s 34, exactly GGUF's. The exporter writes
these formats (docs/quantized.md), so the account, the solver and the Bundle price the same bytes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig

# float dtype -> bytes per element (quantized dtypes: hotcold.quant.QFormat, see quant_format)
DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANT_EXAMPLES = ("q4", "q8", "q4a", "q8a", "q4_g64", "q4_0", "q8_0", "q4_1")
_ALIASES = {
    "fp32": "float32", "f32": "float32", "float": "float32", "torch.float32": "float32",
    "fp16": "float16", "f16": "float16", "half": "float16", "torch.float16": "float16",
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
}
COLD_MODES = ("threshold", "predictor", "exact")
ACT_BYTES = 4  # activations and buffers are float32
INDEX_BYTES = 4  # int32 neuron indices


def canonical_dtype(dtype: Any) -> str:
    """'fp16', 'f16', torch.float16, 'half' -> 'float16'; 'q4', 'q4_0' -> 'q4_g32' (hotcold.quant's name);
    unknown -> InputError listing what is known."""
    from hotcold.qformat import parse_format

    name = str(dtype).lower()
    name = _ALIASES.get(name, name)
    if name in DTYPES:
        return name
    if name.startswith("q"):
        fmt = parse_format(name)  # InputError for a malformed q... name
        if fmt is not None:
            return fmt.name
    raise InputError(f"unknown weight dtype {dtype!r}",
                     f"use one of: {', '.join(DTYPES)} (aliases: fp32, fp16, bf16), or a quantized format: "
                     f"{', '.join(QUANT_EXAMPLES)}")


def quant_format(dtype: Any):
    """The hotcold.quant.QFormat of a quantized dtype, None for a float dtype."""
    from hotcold.qformat import parse_format

    d = canonical_dtype(dtype)
    return None if d in FLOAT_DTYPES else parse_format(d)


def is_float(dtype: Any) -> bool:
    return canonical_dtype(dtype) in FLOAT_DTYPES


def embedding_dtype(dtype: Any) -> str:
    """dtype of the token embedding: the weight dtype when it is a float type, float16 otherwise."""
    d = canonical_dtype(dtype)
    return d if d in FLOAT_DTYPES else "float16"


def small_dtype(dtype: Any) -> str:
    """dtype of norms, biases: the weight dtype when it is a float type, float32 otherwise."""
    d = canonical_dtype(dtype)
    return d if d in FLOAT_DTYPES else "float32"


def default_kv_dtype(dtype: Any) -> str:
    """dtype of the KV cache: the weight dtype when it is a float type, float16 otherwise."""
    d = canonical_dtype(dtype)
    return d if d in FLOAT_DTYPES else "float16"


def row_bytes(n_elements: int, dtype: Any) -> int:
    """Bytes of one row of `n_elements` values (quantized formats: whole groups only, scales included)."""
    d = canonical_dtype(dtype)
    if d in DTYPES:
        return n_elements * DTYPES[d]
    fmt = quant_format(d)
    if n_elements % fmt.group:
        raise InputError(f"a row of {n_elements} values cannot be stored as {d} (blocks of {fmt.group})",
                         "choose a float dtype for this model, or a quantization group that divides the row")
    return fmt.row_bytes(n_elements)


def tensor_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of a tensor of `shape` (row-major, blocks along the last dimension)."""
    if not shape:
        return row_bytes(1, dtype)
    rows = 1
    for s in shape[:-1]:
        rows *= int(s)
    return rows * row_bytes(int(shape[-1]), dtype)


# ---- FFN neurons ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronBytes:
    """Bytes of one FFN neuron's rows: gate row, up row, and its down column stored as a row."""

    gate: int
    up: int
    down: int

    @property
    def total(self) -> int:
        return self.gate + self.up + self.down


def neuron_bytes(cfg: ModelConfig, dtype: Any) -> NeuronBytes:
    r = row_bytes(cfg.dim, dtype)
    return NeuronBytes(gate=r, up=r, down=r)


# ---- dense tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseBytes:
    """Bytes of the tensors that are not FFN neurons (all on the GPU side)."""

    attention_per_layer: int  # wq [n_heads*hd, dim], wk/wv [n_kv*hd, dim], wo [dim, n_heads*hd] (+ q/k/v biases)
    norms_per_layer: int  # attention_norm [dim], ffn_norm [dim]
    embedding: int  # [vocab, dim]
    lm_head: int  # [vocab, dim], 0 when tied to the embedding
    final_norm: int  # [dim]
    n_layers: int

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.norms_per_layer

    @property
    def total(self) -> int:
        return self.n_layers * self.per_layer + self.embedding + self.lm_head + self.final_norm

    def to_json(self) -> dict[str, int]:
        return {"attention": self.n_layers * self.attention_per_layer, "norms": self.n_layers * self.norms_per_layer,
                "embedding": self.embedding, "lm_head": self.lm_head, "final_norm": self.final_norm}


def attention_bytes(cfg: ModelConfig, dtype: Any) -> int:
    """One layer's attention weights (and q/k/v biases)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    b = (tensor_bytes((q, cfg.dim), dtype) + 2 * tensor_bytes((kv, cfg.dim), dtype)
         + tensor_bytes((cfg.dim, q), dtype))
    if cfg.qkv_bias:
        b += tensor_bytes((q + 2 * kv,), small_dtype(dtype))
    return b


def dense_bytes(cfg: ModelConfig, dtype: Any) -> DenseBytes:
    small = small_dtype(dtype)
    emb = tensor_bytes((cfg.vocab_size, cfg.dim), embedding_dtype(dtype))
    head = tensor_bytes((cfg.vocab_size, cfg.dim), dtype)  # a tied head is the embedding itself
    return DenseBytes(attention_per_layer=attention_bytes(cfg, dtype),
                      norms_per_layer=2 * tensor_bytes((cfg.dim,), small),
                      embedding=emb, lm_head=0 if cfg.tie_embeddings else head,
                      final_norm=tensor_bytes((cfg.dim,), small), n_layers=cfg.n_layers)


def kv_cache_bytes_per_layer(cfg: ModelConfig, ctx_len: int, dtype: Any, batch: int = 1) -> int:
    """K and V for `ctx_len` tokens of one layer; `dtype` is the KV cache's own dtype."""
    return 2 * batch * tensor_bytes((ctx_len, cfg.n_kv_heads * cfg.head_dim), dtype)


def kv_cache_bytes(cfg: ModelConfig, ctx_len: int, dtype: Any, batch: int = 1) -> int:
    """K and V for `ctx_len` tokens in every layer; `dtype` is the KV cache's own dtype."""
    if ctx_len < 1:
        raise InputError(f"context length {ctx_len} must be at least 1", "pass --ctx-len 2048 or similar")
    return cfg.n_layers * kv_cache_bytes_per_layer(cfg, ctx_len, dtype, batch)


# ---- predictors and buffers -------------------------------------------------------------------
def default_predictor_rank(cfg: ModelConfig) -> int:
    """Hidden width of a layer's low-rank predictor (dim -> rank -> n_ff): dim/8, within [16, 1024].

    For LLaMA-70B shape that is 1024, whose 37.7 M parameters are 5.4% of the layer's FFN — the size
    Deja Vu and PowerInfer report ("a few percent"); the exporter may choose another rank per layer.
    """
    return int(min(1024, max(16, cfg.dim // 8)))


def predictor_bytes(cfg: ModelConfig, rank: int, dtype: Any) -> int:
    """One layer's predictor: Linear(dim, rank) + Linear(rank, n_ff) with biases, in a float dtype."""
    d = small_dtype(dtype) if is_float(dtype) else "float16"
    return (tensor_bytes((rank, cfg.dim), d) + tensor_bytes((rank,), d)
            + tensor_bytes((cfg.n_ff, rank), d) + tensor_bytes((cfg.n_ff,), d))


@dataclass(frozen=True)
class BufferBytes:
    gpu: int
    cpu: int


def buffer_bytes(cfg: ModelConfig, ctx_len: int, batch_tokens: int = 1) -> BufferBytes:
    """float32 activation buffers for decoding `batch_tokens` tokens at a time with a `ctx_len` context.

    GPU: hidden, residual, normed input, q, k, v, attention scores [n_heads, ctx_len], attention output,
    gate and up outputs [n_ff] each, FFN output, the CPU's partial sum, logits [vocab].
    CPU: FFN input, gate outputs [n_ff], intermediate [n_ff], active neuron indices [n_ff] int32, partial sum.
    """
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    gpu = ACT_BYTES * (3 * cfg.dim + q + 2 * kv + cfg.n_heads * ctx_len + q + 2 * cfg.n_ff + 2 * cfg.dim
                       + cfg.vocab_size)
    cpu = ACT_BYTES * (2 * cfg.dim + 2 * cfg.n_ff) + INDEX_BYTES * cfg.n_ff
    return BufferBytes(gpu=gpu * batch_tokens, cpu=cpu * batch_tokens)


# ---- a whole placement ------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryAccount:
    """Every byte a placement puts on each device, by component."""

    gpu: dict[str, int]  # attention, norms, embedding, lm_head, final_norm, kv_cache, predictors, buffers, ffn_hot
    cpu: dict[str, int]  # ffn_cold, buffers
    ffn_gpu_per_layer: list[int] = field(default_factory=list)
    ffn_cpu_per_layer: list[int] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())

    @property
    def gpu_fixed(self) -> int:
        """GPU bytes that do not depend on the placement (everything but the hot FFN rows)."""
        return self.gpu_total - self.gpu["ffn_hot"]

    @property
    def cpu_fixed(self) -> int:
        return self.cpu_total - self.cpu["ffn_cold"]

    def to_json(self) -> dict[str, Any]:
        return {"gpu": dict(self.gpu), "cpu": dict(self.cpu), "gpu_total": self.gpu_total,
                "cpu_total": self.cpu_total}


def placement_bytes(cfg: ModelConfig, n_hot_per_layer: Sequence[int], dtype: Any, *, ctx_len: int,
                    cold_mode: str = "threshold", predictor_rank: int | Sequence[int] | None = None,
                    predictor_dtype: Any = None, kv_dtype: Any = None, batch_tokens: int = 1) -> MemoryAccount:
    """The memory a placement needs on each device (see the module docstring for what is counted).

    n_hot_per_layer: hot (GPU) neurons per layer; the rest of the layer's n_ff neurons are cold (CPU).
    predictor_rank: one rank for every layer, or one per layer (an exported bundle's predictors are
    sized per layer); given per layer, the predictors are counted whatever the cold mode (a bundle that
    ships them holds them). predictor_dtype: their storage dtype (default: the weights').
    """
    if cold_mode not in COLD_MODES:
        raise InputError(f"unknown cold-neuron mode {cold_mode!r}", f"use one of: {', '.join(COLD_MODES)}")
    n_hot = [int(k) for k in n_hot_per_layer]
    if len(n_hot) != cfg.n_layers or any(k < 0 or k > cfg.n_ff for k in n_hot):
        raise InputError(f"n_hot_per_layer must have {cfg.n_layers} entries in [0, {cfg.n_ff}]",
                         "pass one hot-neuron count per layer")
    nb = neuron_bytes(cfg, dtype).total
    d = dense_bytes(cfg, dtype)
    kvd = canonical_dtype(kv_dtype) if kv_dtype is not None else default_kv_dtype(dtype)
    buf = buffer_bytes(cfg, ctx_len, batch_tokens)
    pred = 0
    pdt = dtype if predictor_dtype is None else predictor_dtype
    if predictor_rank is not None and not isinstance(predictor_rank, numbers.Integral):
        ranks = [int(r) for r in predictor_rank]
        if len(ranks) != cfg.n_layers or any(r < 0 for r in ranks):
            raise InputError(f"predictor ranks must have {cfg.n_layers} entries >= 0", "pass one rank per layer")
        pred = sum(predictor_bytes(cfg, r, pdt) for r in ranks)
    elif cold_mode == "predictor":
        pred = cfg.n_layers * predictor_bytes(cfg, predictor_rank or default_predictor_rank(cfg), pdt)
    gpu_ffn = [k * nb for k in n_hot]
    cpu_ffn = [(cfg.n_ff - k) * nb for k in n_hot]
    gpu = {**d.to_json(), "kv_cache": kv_cache_bytes(cfg, ctx_len, kvd), "predictors": pred,
           "buffers": buf.gpu, "ffn_hot": sum(gpu_ffn)}
    cpu = {"ffn_cold": sum(cpu_ffn), "buffers": buf.cpu}
    return MemoryAccount(gpu=gpu, cpu=cpu, ffn_gpu_per_layer=gpu_ffn, ffn_cpu_per_layer=cpu_ffn)


# ---- sizes with units -------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'24GiB', '48GB', '512MiB', '1.5 TB', '1000000' -> bytes. Decimal units are powers of 10."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        s = str(text).strip().lower().replace("_", "").replace(" ", "")
        i = len(s)
        while i and s[i - 1].isalpha():
            i -= 1
        num, unit = s[:i], s[i:]
        try:
            value = float(num)
        except ValueError:
            value = float("nan")
        if unit not in _UNITS or value != value:
            raise InputError(f"cannot read {what} {text!r}",
                             "write a number of bytes with an optional unit: 24GiB, 48GB, 512MiB, 1000000")
    if value < 0:
        raise InputError(f"{what} {text!r} is negative", "pass a size of zero or more, such as 24GiB")
    return int(round(value * _UNITS[unit]))


def format_bytes(n: float) -> str:
    """Bytes in binary units with 3 significant digits: 25.3 GiB, 512 MiB, 17 B."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{sign}{v:.3g} {unit}" if v < 100 else f"{sign}{v:.0f} {unit}"
    return f"{sign}{n:.0f} B"


__all__ = ["DTYPES", "COLD_MODES", "canonical_dtype", "quant_format", "is_float", "embedding_dtype", "small_dtype", "default_kv_dtype", "row_bytes",
           "tensor_bytes", "NeuronBytes", "neuron_bytes", "DenseBytes", "dense_bytes", "attention_bytes",
           "kv_cache_bytes", "kv_cache_bytes_per_layer", "default_predictor_rank", "predictor_bytes",
           "BufferBytes", "buffer_bytes", "MemoryAccount", "placement_bytes", "parse_bytes", "format_bytes"]
