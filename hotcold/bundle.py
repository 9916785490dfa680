"""The Bundle: its format (design.md §2, §5), the contract between `hotcold export` and the runtime, and its
one reader (`Bundle.load`), which every path that runs a Bundle goes through.

A Bundle is a directory (format version 1):

    manifest.json        kind "bundle", format_version, producer, and
                         model {fingerprint, source, config}, dtype, cpu_layout (bundled | split), ctx_len
                         (the context the memory account was sized for), tokenizer {file, bos_id, eos_ids,
                         add_bos, chat_template} (null when the model has none), placement {summary, n_hot,
                         content_hash}, profile {content_hash} (null when none was used),
                         activation {rule, thresholds [n_layers], target_sparsity, source},
                         memory (hotcold.memory account of this bundle), predictors {...} or null,
                         export {seconds, options}, files [{path, bytes, sha256, dtype, tensors}],
                         manifest_sha256 (of the manifest itself without this field: a changed value in
                         manifest.json is detected like a changed byte in any other file)
    gpu.safetensors      what the GPU side holds (shapes: see `gpu_tensor_shapes`)
        tok_embeddings             [V, D]
        norm                       [D]
        output                     [V, D]          (absent when the LM head is tied to the embedding)
        layers.{i}.attn_norm       [D]
        layers.{i}.wqkv            [(H + 2 KV) Hd, D]   q, k, v rows stacked (as dense.LayerWeights)
        layers.{i}.bqkv            [(H + 2 KV) Hd]      (Qwen2-style biases only)
        layers.{i}.wo              [D, H Hd]
        layers.{i}.ffn_norm        [D]
        layers.{i}.hot_gate_up     [2 k_i, D]     rows 0..k-1: gate rows of the hot neurons (hot-first
                                                  order), rows k..2k-1: their up rows
        layers.{i}.hot_down        [k_i, D]       row j: hot neuron j's down column (W_down[:, n].T),
                                                  so a neuron's down weights are one contiguous row
    cpu.safetensors      what the CPU worker holds, in one of two layouts (manifest "cpu_layout"):
      bundled  (the `gate` rule's: gate rows read densely, up/down rows only for active neurons)
        layers.{i}.cold_gate       [c_i, D]       gate rows of the cold neurons, one matrix
        layers.{i}.cold_up_down    [c_i, 2 D]     row j: [up row | down column] of cold neuron j —
                                                  row-column bundling ("LLM in a flash"): one
                                                  contiguous block per active neuron
      split    (the `product` rule's: gate and up rows read densely, down rows only for active neurons)
        layers.{i}.cold_gate_up_t  [D, 2 c_i]     the [2c, D] matrix of gate rows (0..c-1) and up rows
                                                  (c..2c-1), stored transposed: column j is neuron j's gate
                                                  row, column c+j its up row — the layout a CPU matrix-vector
                                                  product streams fastest (measured ~20% faster than
                                                  row-major at 1-2 threads; dense.gemv_layout)
        layers.{i}.cold_down       [c_i, D]       row j: cold neuron j's down column
    neurons.safetensors  the neuron index maps (int32): position in the bundle -> neuron id of the model
        layers.{i}.hot             [k_i]          hot neurons, hottest first (placement order)
        layers.{i}.cold            [c_i]          cold neurons, hottest first
    tokenizer.json       the `tokenizers` serialisation of the model's tokenizer (when it has one)
    predictors/layer_{i:03d}.onnx  (optional) per-layer predictor: x [batch, D] float32 -> logits
                         [batch, n_ff] float32, outputs in bundle order (hot first, then cold); a neuron
                         is predicted active when its logit exceeds the layer's decision threshold

k_i = n_hot[i], c_i = n_ff - k_i. Every weight is stored in the bundle dtype (float32, bfloat16 or
float16); index maps are int32. Hot and cold neurons keep the placement's frequency order, so the
runtime (and a later migration step) can treat a prefix of either side as "the hottest".

Quantized Bundles (dtype a hotcold.quant format such as q4_g32; docs/quantized.md): every large matrix
(`QUANTIZED_LEAVES`: wqkv, wo, output, hot_gate_up, hot_down, cold_gate, cold_up_down) is one U8 tensor
[rows, QFormat.row_bytes(cols)] holding the packed rows of the [rows, cols] matrix named above, with
manifest quant.tensors[name] = QTensor.meta() + provenance (where each part came from: kept /
quantized / requantized); tok_embeddings stays float16 (manifest quant.embedding), norms and biases
are float32 (quant.small). The CPU layout is `bundled` (the quantized cold kernel's). The reader returns
those tensors as hotcold.quant.QTensor.

Activation rules of the `threshold` and `predictor` modes (t_l per layer, in the manifest):
    gate       |act(W_gate x)_i| > t_l       CATS: decidable from the gate rows alone (what the layout and
                                             the cost model assume: gate rows read densely, up/down rows
                                             only for active neurons)
    product    |act(W_gate x)_i · (W_up x)_i| > t_l   the profiler's "magnitude" definition; needs the up
                                             rows of every cold neuron too
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from dataclasses import dataclass, field

from hotcold.artifacts import MANIFEST, read_manifest, verify_files
from hotcold.errors import IncompatibleError, InfeasibleError, InputError
from hotcold.memory import MemoryAccount, format_bytes, parse_bytes, placement_bytes, predictor_bytes, tensor_bytes
from hotcold.model.config import ModelConfig

KIND = "bundle"
FORMAT_VERSION = 1
GPU_FILE = "gpu.safetensors"
CPU_FILE = "cpu.safetensors"
NEURONS_FILE = "neurons.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PREDICTOR_DIR = "predictors"
RULES = ("gate", "product")
CPU_LAYOUTS = ("bundled", "split")
DEFAULT_LAYOUT = "auto"  # the layout that fits the rule (layout_for)


def layout_for(layout: str, rule: str) -> str:
    """`auto` -> the rule's layout: `split` for `product` (gate and up rows are read densely: one gemv over
    the transposed [D, 2c] matrix; measured on the 2-core dev machine, SmolLM2 at 50% sparsity: split
    66.5 vs bundled 85.3 ms/token against 63.1 dense, in the same run), `bundled` for `gate` (only the gate
    rows are read densely; an active neuron's up and down rows are one contiguous block)."""
    if layout == "auto":
        return "split" if rule == "product" else "bundled"
    return layout
COLD_MODES = ("exact", "threshold", "predictor")

# safetensors dtype tags <-> our canonical dtype names (hotcold.memory); uint8 holds quantized rows
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64", "bool": "BOOL",
             "uint8": "U8"}
ST_DTYPES_INV = {v: k for k, v in ST_DTYPES.items()}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "bool": 1, "uint8": 1}
# the matrices a quantized Bundle stores quantized (name leaves); everything else stays float
QUANTIZED_LEAVES = ("wqkv", "wo", "output", "hot_gate_up", "hot_down", "cold_gate", "cold_up_down")


def is_quantized_tensor(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in QUANTIZED_LEAVES


def stored_tensors(shapes: dict[str, tuple[int, ...]], dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (stored dtype, stored shape) of a Bundle file's tensors, from their logical shapes.

    Float bundles store every weight in `dtype`. Quantized ones store the QUANTIZED_LEAVES as uint8
    [rows, row_bytes(cols)], the token embedding in float16 and norms / biases in float32 (hotcold.memory's
    embedding_dtype and small_dtype: the account prices the same choice)."""
    from hotcold.memory import embedding_dtype, quant_format, small_dtype

    fmt = quant_format(dtype)
    if fmt is None:
        return {n: (dtype, s) for n, s in shapes.items()}
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for n, s in shapes.items():
        if is_quantized_tensor(n):
            out[n] = ("uint8", (s[0], fmt.row_bytes(s[1])))
        elif n == "tok_embeddings":
            out[n] = (embedding_dtype(dtype), s)
        else:
            out[n] = (small_dtype(dtype), s)
    return out


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The manifest's own hash: every field but `manifest_sha256`, in canonical JSON (so that a changed
    value in manifest.json itself is detected, like a changed byte in any other file)."""
    from hotcold.artifacts import sha256_json

    return sha256_json({k: v for k, v in manifest.items() if k != "manifest_sha256"})


def seal_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the manifest's own sha256 and rewrite root/manifest.json."""
    manifest = json.loads(json.dumps(manifest))  # hash exactly what a reader will see
    sealed = {**{k: v for k, v in manifest.items() if k != "manifest_sha256"},
              "manifest_sha256": manifest_digest(manifest)}
    (root / "manifest.json").write_text(json.dumps(sealed, indent=2) + "\n")
    return sealed


def predictor_file(layer: int) -> str:
    return f"{PREDICTOR_DIR}/layer_{layer:03d}.onnx"


def given_thresholds(value: float | list[float] | tuple[float, ...], n_layers: int) -> list[float]:
    """t_l given by the user: one value for every layer, or one per layer (checked)."""
    import numpy as np

    vals = [float(value)] * n_layers if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != n_layers:
        raise InputError(f"{len(vals)} thresholds given for a model with {n_layers} layers",
                         "pass one value, or one per layer")
    if not all(np.isfinite(v) and v >= 0 for v in vals):
        raise InputError("thresholds must be finite numbers >= 0", "check --threshold")
    return vals


# ---- expected tensors ------------------------------------------------------------------------------
def gpu_tensor_shapes(cfg: ModelConfig, n_hot: list[int]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of gpu.safetensors, in file order."""
    D, V = cfg.dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings": (V, D), "norm": (D,)}
    if not cfg.tie_embeddings:
        shapes["output"] = (V, D)
    for i in range(cfg.n_layers):
        k = int(n_hot[i])
        shapes[f"layers.{i}.attn_norm"] = (D,)
        shapes[f"layers.{i}.wqkv"] = (q + 2 * kv, D)
        if cfg.qkv_bias:
            shapes[f"layers.{i}.bqkv"] = (q + 2 * kv,)
        shapes[f"layers.{i}.wo"] = (D, q)
        shapes[f"layers.{i}.ffn_norm"] = (D,)
        shapes[f"layers.{i}.hot_gate_up"] = (2 * k, D)
        shapes[f"layers.{i}.hot_down"] = (k, D)
    return shapes


def cpu_tensor_shapes(cfg: ModelConfig, n_hot: list[int], layout: str) -> dict[str, tuple[int, ...]]:
    if layout not in CPU_LAYOUTS:
        raise IncompatibleError(f"unknown CPU layout {layout!r}", f"use one of: {', '.join(CPU_LAYOUTS)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.n_layers):
        c = cfg.n_ff - int(n_hot[i])
        if layout == "bundled":
            shapes[f"layers.{i}.cold_gate"] = (c, cfg.dim)
            shapes[f"layers.{i}.cold_up_down"] = (c, 2 * cfg.dim)
        else:
            shapes[f"layers.{i}.cold_gate_up_t"] = (cfg.dim, 2 * c)
            shapes[f"layers.{i}.cold_down"] = (c, cfg.dim)
    return shapes


def neuron_tensor_shapes(cfg: ModelConfig, n_hot: list[int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.n_layers):
        shapes[f"layers.{i}.hot"] = (int(n_hot[i]),)
        shapes[f"layers.{i}.cold"] = (cfg.n_ff - int(n_hot[i]),)
    return shapes


FFN_GPU = ("hot_gate_up", "hot_down")
FFN_CPU = ("cold_gate", "cold_up_down", "cold_gate_up_t", "cold_down")


# ---- safetensors, read without copying ----------------------------------------------------------
def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header dict, offset of the data section) of a safetensors file; IncompatibleError if malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise IncompatibleError(f"{path} is not a safetensors file (too short)", "re-export the bundle")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 1 << 30):
            raise IncompatibleError(f"{path} is not a safetensors file (bad header length)", "re-export the bundle")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IncompatibleError(f"{path} has a corrupt safetensors header", "re-export the bundle") from None
    if not isinstance(header, dict):
        raise IncompatibleError(f"{path} has a corrupt safetensors header", "re-export the bundle")
    return header, 8 + n


def mmap_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of a safetensors file as a torch tensor backed by a private memory map (no copy).

    Pages are read from the file on first touch and shared with the page cache; the mapping is
    copy-on-write, so a tensor written to in place never changes the file.
    """
    import torch

    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
    path = Path(path)
    header, base = read_header(path)
    size = path.stat().st_size
    out: dict[str, Any] = {}
    mm = None
    if size > base:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_DTYPES_INV.get(rec.get("dtype"))
        shape = tuple(int(s) for s in rec.get("shape", ()))
        begin, end = (int(v) for v in rec.get("data_offsets", (0, 0)))
        n = 1
        for s in shape:
            n *= s
        if dtype is None or end - begin != n * ITEMSIZE[dtype] or base + end > size or begin < 0:
            raise IncompatibleError(f"{path}: tensor {name} has an inconsistent header entry", "re-export the bundle")
        if n == 0:
            out[name] = torch.empty(shape, dtype=tdt[dtype])
            continue
        t = torch.frombuffer(mm, dtype=tdt[dtype], count=n, offset=base + begin)
        out[name] = t.view(shape)
    return out


# ---- the reader -------------------------------------------------------------------------------------
# Checks, each failing with one message that names the file: the manifest parses, is a bundle of a
# version we read, and is unaltered (it carries its own sha256); every listed file exists with its size
# and sha256 (`verify="full"`; `"size"` skips hashing for very large bundles); the required files are
# listed; every tensor has the shape the model config and placement imply; the weight files were written
# for the manifest's model; the FFN bytes are what hotcold.memory accounts; and (optionally) the bundle is
# of the model the caller expects.
VERIFY = ("full", "size", "none")


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    gpu: dict[str, Any]  # name -> torch tensor (memory-mapped)
    cpu: dict[str, Any]
    neurons: dict[str, Any]
    tokenizer: Any = None  # hotcold.model.tokenizer.Tokenizer | None
    verified: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- views ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def cpu_layout(self) -> str:
        return self.manifest["cpu_layout"]

    @property
    def quant(self) -> Any:
        """The hotcold.quant.QFormat of a quantized bundle, None for a float one."""
        from hotcold.memory import quant_format

        return quant_format(self.dtype)

    @property
    def n_hot(self) -> list[int]:
        return [int(k) for k in self.manifest["placement"]["n_hot"]]

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def activation(self) -> dict[str, Any] | None:
        return self.manifest.get("activation")

    @property
    def thresholds(self) -> list[float] | None:
        a = self.activation
        return None if a is None else [float(t) for t in a["thresholds"]]

    @property
    def rule(self) -> str | None:
        a = self.activation
        return None if a is None else a["rule"]

    @property
    def predictors(self) -> dict[str, Any] | None:
        return self.manifest.get("predictors")

    def hot_index(self, layer: int):
        return self.neurons[f"layers.{layer}.hot"]

    def cold_index(self, layer: int):
        return self.neurons[f"layers.{layer}.cold"]

    # ---- memory -----------------------------------------------------------------------------------
    def account(self, ctx_len: int, mode: str = "threshold") -> MemoryAccount:
        """What running this bundle holds on each device (hotcold.memory), for a `ctx_len` KV cache."""
        acct = placement_bytes(self.config, self.n_hot, self.dtype, ctx_len=ctx_len, cold_mode="threshold")
        if mode == "predictor" and self.predictors:
            acct.gpu["predictors"] = sum(predictor_bytes(self.config, int(p["rank"]), "float32")
                                         for p in self.predictors["layers"])
        return acct

    def check_budget(self, gpu_budget: int | str | None, ctx_len: int, mode: str = "threshold") -> MemoryAccount:
        acct = self.account(ctx_len, mode)
        if gpu_budget is None:
            return acct
        budget = parse_bytes(gpu_budget, "GPU budget")
        if budget < acct.gpu_total:
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in acct.gpu.items() if v)
            raise InfeasibleError(
                f"GPU budget {format_bytes(budget)} is smaller than bundle {self.path}'s GPU part "
                f"{format_bytes(acct.gpu_total)} at a {ctx_len}-token context ({parts})",
                "raise --gpu-budget, shorten the context (--ctx-len), or export a placement solved for this budget")
        return acct

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: str = "full", expect_fingerprint: str | None = None) -> Bundle:
        path = Path(path)
        if verify not in VERIFY:
            raise InputError(f"unknown verify level {verify!r}", f"use one of: {', '.join(VERIFY)}")
        manifest = read_manifest(path, KIND, (FORMAT_VERSION,))
        if manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise IncompatibleError(f"bundle {path}: {MANIFEST} was altered (its recorded sha256 does not match)",
                                    "re-export the bundle")
        try:
            cfg = ModelConfig.from_json(manifest["model"]["config"])
            n_hot = [int(k) for k in manifest["placement"]["n_hot"]]
            listed = {rec["path"] for rec in manifest["files"]}
        except (KeyError, TypeError, ValueError) as e:
            raise IncompatibleError(f"bundle {path}: {MANIFEST} lacks {e}", "re-export the bundle") from None
        if expect_fingerprint is not None and manifest["model"]["fingerprint"] != expect_fingerprint:
            raise IncompatibleError(
                f"bundle {path} ({MANIFEST}) was exported from {manifest['model'].get('source')} "
                f"(fingerprint {manifest['model']['fingerprint']}), not the expected model ({expect_fingerprint})",
                "export a bundle of this model, or pass the bundle that belongs to it")
        required = [GPU_FILE, CPU_FILE, NEURONS_FILE]
        if manifest.get("tokenizer"):
            required.append(manifest["tokenizer"]["file"])
        if manifest.get("predictors"):
            required += [predictor_file(i) for i in range(cfg.n_layers)]
        for name in required:
            if name not in listed:
                raise IncompatibleError(f"bundle {path}: {MANIFEST} does not list {name}", "re-export the bundle")
        if verify == "full":
            verify_files(path, manifest, "bundle")
        else:
            for rec in manifest["files"]:
                p = path / rec["path"]
                if not p.is_file():
                    raise IncompatibleError(f"bundle {path} is missing {rec['path']}", "re-export the bundle")
                if verify == "size" and p.stat().st_size != rec["bytes"]:
                    raise IncompatibleError(f"bundle {path}: {rec['path']} was altered (size differs)",
                                            "re-export the bundle")
        tensors = {}
        dtype = manifest["dtype"]
        qmeta = _quant_meta(path, manifest)
        for name, shapes, want_dtype in (
                (GPU_FILE, gpu_tensor_shapes(cfg, n_hot), dtype),
                (CPU_FILE, cpu_tensor_shapes(cfg, n_hot, manifest.get("cpu_layout")), dtype),
                (NEURONS_FILE, neuron_tensor_shapes(cfg, n_hot), "int32")):
            tensors[name] = _load_checked(path / name, shapes, want_dtype, manifest["model"]["fingerprint"], qmeta)
        tok = None
        if manifest.get("tokenizer"):
            tok = _tokenizer(path, manifest["tokenizer"])
        b = cls(path=path, manifest=manifest, config=cfg, gpu=tensors[GPU_FILE], cpu=tensors[CPU_FILE],
                neurons=tensors[NEURONS_FILE], tokenizer=tok, verified=verify)
        b._check_bytes()
        return b

    def _check_bytes(self) -> None:
        """The bytes held must be what hotcold.memory says this bundle holds (one accounting, re-checked)."""
        acct = self.account(int(self.manifest.get("ctx_len") or 1))

        def held(t: Any) -> int:  # a QTensor's packed bytes (scales included), or a float tensor's
            return int(t.nbytes) if hasattr(t, "fmt") else tensor_bytes(t.shape, self.dtype)

        gpu_ffn = sum(held(t) for n, t in self.gpu.items() if n.rsplit(".", 1)[-1] in FFN_GPU)
        cpu_ffn = sum(held(t) for t in self.cpu.values())
        if gpu_ffn != acct.gpu["ffn_hot"] or cpu_ffn != acct.cpu["ffn_cold"]:
            raise IncompatibleError(f"bundle {self.path}: FFN tensors hold {gpu_ffn} + {cpu_ffn} bytes, the memory "
                                    f"account says {acct.gpu['ffn_hot']} + {acct.cpu['ffn_cold']}", "re-export the bundle")


def _quant_meta(path: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """manifest quant.tensors of a quantized bundle (checked to be there and of the bundle's format), else None."""
    from hotcold.memory import quant_format

    try:
        fmt = quant_format(manifest["dtype"])
    except InputError:
        raise IncompatibleError(f"bundle {path}: {MANIFEST} has an unknown dtype {manifest['dtype']!r}",
                                "re-export the bundle with a float dtype or q4 / q8") from None
    if fmt is None:
        return None
    if manifest.get("cpu_layout") != "bundled":
        raise IncompatibleError(f"bundle {path}: a quantized bundle must have the bundled CPU layout, not "
                                f"{manifest.get('cpu_layout')!r}", "re-export the bundle")
    q = manifest.get("quant")
    if not isinstance(q, dict) or not isinstance(q.get("tensors"), dict) or q.get("format") != fmt.name:
        raise IncompatibleError(f"bundle {path}: {MANIFEST} is for {fmt.name} weights but lacks its quant record "
                                "(format and per-tensor metadata)", "re-export the bundle")
    return q["tensors"]


def _check_qmeta(p: Path, name: str, meta: Any, fmt_name: str, shape: tuple[int, ...]) -> None:
    """The manifest's QTensor.meta() of one tensor must be the bundle's format at the implied shape."""
    where = f"bundle {p.parent}: {p.name} tensor {name}"
    if not isinstance(meta, dict):
        raise IncompatibleError(f"{where} has no quantization metadata in {MANIFEST}", "re-export the bundle")
    want = {"format": fmt_name, "shape": list(shape)}
    got = {"format": meta.get("format"), "shape": meta.get("shape")}
    if got != want:
        raise IncompatibleError(f"{where} is recorded as {got['format']} {got['shape']}, the bundle's dtype and "
                                f"placement need {fmt_name} {list(shape)}", "re-export the bundle")


def _load_checked(p: Path, shapes: dict[str, tuple[int, ...]], dtype: str, fingerprint: str,
                  qmeta: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    header, _ = read_header(p)
    meta = header.get("__metadata__") or {}
    fp = meta.get("model_fingerprint")
    if fp is not None and fp != fingerprint:
        raise IncompatibleError(f"bundle {p.parent}: {p.name} was written for model fingerprint {fp}, but "
                                f"{MANIFEST} is for {fingerprint} (files of two bundles mixed)", "re-export the bundle")
    names = [n for n in header if n != "__metadata__"]
    missing = [n for n in shapes if n not in header]
    extra = [n for n in names if n not in shapes]
    if missing or extra:
        raise IncompatibleError(f"bundle {p.parent}: {p.name} does not hold the tensors its manifest implies "
                                f"(missing {missing[:3]}, unexpected {extra[:3]})", "re-export the bundle")
    stored = stored_tensors(shapes, dtype) if dtype != "int32" else {n: (dtype, s) for n, s in shapes.items()}
    for n, (sdt, shape) in stored.items():
        rec = header[n]
        if tuple(rec["shape"]) != tuple(shape) or ST_DTYPES_INV.get(rec["dtype"]) != sdt:
            raise IncompatibleError(f"bundle {p.parent}: {p.name} has {n} {rec['dtype']} {rec['shape']}, the manifest's "
                                    f"model and placement need {sdt} {list(shape)}", "re-export the bundle")
    out = mmap_tensors(p)
    if qmeta is not None and dtype != "int32":
        from hotcold.quant import QTensor

        for n, shape in shapes.items():
            if is_quantized_tensor(n):
                _check_qmeta(p, n, qmeta.get(n), dtype, shape)
                try:
                    qt = QTensor.from_packed(out[n], qmeta[n])
                except InputError as e:
                    raise IncompatibleError(f"bundle {p.parent}: {p.name} tensor {n}: {e.what}",
                                            "re-export the bundle") from None
                if qt.fmt.name != dtype:  # bits / group / asym must spell the recorded format
                    raise IncompatibleError(f"bundle {p.parent}: {p.name} tensor {n} has bits/group/asym of "
                                            f"{qt.fmt.name}, recorded as {dtype}", "re-export the bundle")
                out[n] = qt
    return out


def _tokenizer(path: Path, entry: dict[str, Any]):
    from tokenizers import Tokenizer as TK

    from hotcold.model.tokenizer import Tokenizer

    p = path / entry["file"]
    try:
        tk = TK.from_str(p.read_text())
    except Exception as e:  # the tokenizers library raises its own exception types
        raise IncompatibleError(f"bundle {path}: {entry['file']} is not a readable tokenizer ({e})",
                                "re-export the bundle") from None
    return Tokenizer(tk=tk, bos_id=entry.get("bos_id"), eos_ids=tuple(entry.get("eos_ids") or ()),
                     add_bos=bool(entry.get("add_bos")), chat_template=entry.get("chat_template"))


def read_bundle_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest alone (checked for kind, version and its own hash), without touching the weights."""
    path = Path(path)
    m = read_manifest(path, KIND, (FORMAT_VERSION,))
    if m.get("manifest_sha256") != manifest_digest(m):
        raise IncompatibleError(f"bundle {path}: {MANIFEST} was altered (its recorded sha256 does not match)",
                                "re-export the bundle")
    return m
