"""Read GGUF files of the `llama` and `qwen2` architectures into a WeightSource.

For `llama`, GGUF (llama.cpp) stores the Q and K projections with their rows permuted so that RoPE can
rotate adjacent pairs ("interleaved"). We undo that permutation at load time and use HF-style
(half-split) RoPE everywhere, so GGUF and Hugging Face checkpoints give identical tensors. `qwen2` files
are written unpermuted (llama.cpp rotates them NEOX-style, i.e. half-split) and carry Q/K/V biases,
RoPE base and RMSNorm epsilon under `qwen2.*` keys, and usually an output matrix of their own.

Quantized tensors (Q4_0 … Q8_0, the K-quants Q2_K … Q6_K, ...) are dequantized by the `gguf` package.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig, RopeScaling
from hotcold.model.weights import WeightSource

SUPPORTED_ARCHS = ("llama", "qwen2")
# Architectures whose Q/K rows llama.cpp permuted for interleaved RoPE (undone at load time).
PERMUTED_QK = ("llama",)

# our name -> GGUF name ({i} = layer)
NAME_TABLE = {
    "tok_embeddings": "token_embd.weight",
    "norm": "output_norm.weight",
    "output": "output.weight",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.{i}.wq": "blk.{i}.attn_q.weight",
    "layers.{i}.wk": "blk.{i}.attn_k.weight",
    "layers.{i}.wv": "blk.{i}.attn_v.weight",
    "layers.{i}.wo": "blk.{i}.attn_output.weight",
    "layers.{i}.bq": "blk.{i}.attn_q.bias",
    "layers.{i}.bk": "blk.{i}.attn_k.bias",
    "layers.{i}.bv": "blk.{i}.attn_v.bias",
    "layers.{i}.ffn_norm": "blk.{i}.ffn_norm.weight",
    "layers.{i}.w_gate": "blk.{i}.ffn_gate.weight",
    "layers.{i}.w_up": "blk.{i}.ffn_up.weight",
    "layers.{i}.w_down": "blk.{i}.ffn_down.weight",
}


def gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return NAME_TABLE[f"layers.{{i}}.{parts[2]}"].format(i=parts[1])
    return NAME_TABLE[name]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: interleaved RoPE rows -> HF half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFSource(WeightSource):
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file {self.path} does not exist", "check the path, or use `hotcold fetch smollm2-135m`")
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # the gguf package raises assorted errors on bad files
            raise InputError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e})",
                             "the file is truncated or corrupt: download it again") from None
        arch = _field(self.reader, "general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise InputError(f"{self.path} is a GGUF of architecture {arch!r}; hotcold supports {', '.join(SUPPORTED_ARCHS)} "
                             "(LLaMA-2/3, Mistral, SmolLM2, Qwen2/2.5)", "use a LLaMA- or Qwen2-family model")
        self.arch = str(arch)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()
        self.description = f"gguf:{self.path}"
        # A truncated file can still parse its header; check the last tensor's data lies inside the file.
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise InputError(f"{self.path} is truncated (tensor {t.name} ends past the end of the file)",
                                 "download the file again")
        missing = [gguf_name(n) for n in self.names() if gguf_name(n) not in self.tensors]
        if missing:
            raise InputError(f"{self.path} lacks tensors {missing[:3]}{'...' if len(missing) > 3 else ''}",
                             f"the file is not a complete {arch}-architecture model")

    def _config(self) -> ModelConfig:
        r = self.reader
        a = _field(r, "general.architecture")

        def kv(key: str, default: Any = None) -> Any:
            return _field(r, f"{a}.{key}", default)

        try:
            dim = int(kv("embedding_length"))
            n_heads = int(kv("attention.head_count"))
            n_layers = int(kv("block_count"))
            n_ff = int(kv("feed_forward_length"))
        except TypeError:
            raise InputError(f"{self.path} lacks llama hyper-parameters in its metadata",
                             "the file is not a complete llama-architecture model") from None
        vocab = kv("vocab_size") or len(_field(r, "tokenizer.ggml.tokens", []) or [])
        emb = self.tensors.get("token_embd.weight")
        if not vocab and emb is not None:
            vocab = int(emb.shape[1])
        scaling = None
        if kv("rope.scaling.type") == "llama3" or "rope_freqs.weight" in self.tensors:
            # LLaMA-3.1 GGUFs store the scaled frequencies as a tensor; we read the factors if given.
            factor = kv("rope.scaling.factor")
            if factor:
                scaling = RopeScaling(factor=float(factor), low_freq_factor=float(kv("rope.scaling.low_freq_factor", 1.0)),
                                      high_freq_factor=float(kv("rope.scaling.high_freq_factor", 4.0)),
                                      original_max_position_embeddings=int(kv("rope.scaling.original_context_length", 8192)))
        head_dim = int(kv("attention.key_length") or kv("rope.dimension_count") or dim // n_heads)
        eos = _field(r, "tokenizer.ggml.eos_token_id")
        eot = _field(r, "tokenizer.ggml.eot_token_id")
        eos_ids = tuple(int(x) for x in dict.fromkeys([eos, eot]) if x is not None)
        bos = _field(r, "tokenizer.ggml.bos_token_id")
        return ModelConfig(
            n_layers=n_layers, dim=dim, n_ff=n_ff, n_heads=n_heads,
            n_kv_heads=int(kv("attention.head_count_kv") or n_heads), vocab_size=int(vocab), head_dim=head_dim,
            norm_eps=float(kv("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(kv("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_seq_len=int(kv("context_length", 4096)),
            tie_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
            name=str(_field(r, "general.name") or self.path.stem),
        )

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        t = self.tensors[gguf_name(name)]
        if t.tensor_type == Q.F32:
            arr = np.asarray(t.data)
        elif t.tensor_type in (Q.F16,):
            arr = np.asarray(t.data).astype(np.float32)
        else:
            try:
                arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise InputError(f"{self.path}: tensor {t.name} uses quantization {t.tensor_type.name}, "
                                 "which the gguf package cannot dequantize", "use a file quantized as F16, Q8_0, Q4_K, ...") from None
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists ne0 (innermost) first
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        leaf = name.rsplit(".", 1)[-1]
        if self.arch not in PERMUTED_QK:
            pass
        elif leaf in ("wq", "bq"):
            arr = unpermute_qk(arr, self.config.n_heads)
        elif leaf in ("wk", "bk"):
            arr = unpermute_qk(arr, self.config.n_kv_heads)
        return torch.from_numpy(np.array(arr, copy=True, order="C")).to(dtype)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the config, the tensor table and the first and last MiB of the file."""
        h = hashlib.sha256(json.dumps(self.config.shape_key(), sort_keys=True).encode())
        for t in self.reader.tensors:
            h.update(f"{t.name}:{t.tensor_type.name}:{list(t.shape)}".encode())
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
        h.update(str(size).encode())
        return h.hexdigest()[:32]

    def summary(self) -> dict[str, Any]:
        """What `hotcold inspect` shows beyond the config: the file, its quantization and its tokenizer."""
        from collections import Counter

        kinds = Counter(t.tensor_type.name for t in self.reader.tensors)
        tok = self.tokenizer()
        template = tok.chat_template or ""
        return {"architecture": self.arch, "file_bytes": self.path.stat().st_size,
                "tensor_types": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                "tokenizer": f"{_field(self.reader, 'tokenizer.ggml.model')} (pre-tokenizer "
                             f"{_field(self.reader, 'tokenizer.ggml.pre', 'default')}), {tok.vocab_size} tokens",
                "add_bos": tok.add_bos, "stop_ids": {i: tok.token_str(i) for i in tok.stop_ids},
                "chat_template": f"{len(template)} characters (Jinja, from the file)" if template else "none"}

    def tokenizer(self):
        from hotcold.model.tokenizer import Tokenizer

        return Tokenizer.from_gguf_reader(self.reader, self.path)
