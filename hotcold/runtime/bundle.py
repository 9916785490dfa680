"""Load and verify a Bundle (format: hotcold/exporter/format.py). The runtime reads nothing else.

Checks, each failing with one message that names the file: the manifest parses, is a bundle of a
version we read, and is unaltered (it carries its own sha256); every listed file exists with its size
and sha256 (`verify="full"`; `"size"` skips hashing for very large bundles); the required files are
listed; every tensor has the shape the model config and placement imply; the weight files were written
for the manifest's model; and (optionally) the bundle is of the model the caller expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotcold.artifacts import MANIFEST, read_manifest, verify_files
from hotcold.errors import IncompatibleError, InfeasibleError, InputError
from hotcold.exporter import format as fmt
from hotcold.memory import MemoryAccount, format_bytes, parse_bytes, placement_bytes, predictor_bytes, tensor_bytes
from hotcold.model.config import ModelConfig

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
                "raise --gpu-budget, shorten the context (--max-len), or export a placement solved for this budget")
        return acct

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: str = "full", expect_fingerprint: str | None = None) -> Bundle:
        path = Path(path)
        if verify not in VERIFY:
            raise InputError(f"unknown verify level {verify!r}", f"use one of: {', '.join(VERIFY)}")
        manifest = read_manifest(path, fmt.KIND, (fmt.FORMAT_VERSION,))
        if manifest.get("manifest_sha256") != fmt.manifest_digest(manifest):
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
        required = [fmt.GPU_FILE, fmt.CPU_FILE, fmt.NEURONS_FILE]
        if manifest.get("tokenizer"):
            required.append(manifest["tokenizer"]["file"])
        if manifest.get("predictors"):
            required += [fmt.predictor_file(i) for i in range(cfg.n_layers)]
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
        for name, shapes, want_dtype in (
                (fmt.GPU_FILE, fmt.gpu_tensor_shapes(cfg, n_hot), dtype),
                (fmt.CPU_FILE, fmt.cpu_tensor_shapes(cfg, n_hot, manifest.get("cpu_layout")), dtype),
                (fmt.NEURONS_FILE, fmt.neuron_tensor_shapes(cfg, n_hot), "int32")):
            tensors[name] = _load_checked(path / name, shapes, want_dtype, manifest["model"]["fingerprint"])
        tok = None
        if manifest.get("tokenizer"):
            tok = _tokenizer(path, manifest["tokenizer"])
        b = cls(path=path, manifest=manifest, config=cfg, gpu=tensors[fmt.GPU_FILE], cpu=tensors[fmt.CPU_FILE],
                neurons=tensors[fmt.NEURONS_FILE], tokenizer=tok, verified=verify)
        b._check_bytes()
        return b

    def _check_bytes(self) -> None:
        """The bytes held must be what hotcold.memory says this bundle holds (one accounting, re-checked)."""
        acct = self.account(int(self.manifest.get("ctx_len") or 1))
        gpu_ffn = sum(tensor_bytes(t.shape, self.dtype) for n, t in self.gpu.items() if n.rsplit(".", 1)[-1] in fmt.FFN_GPU)
        cpu_ffn = sum(tensor_bytes(t.shape, self.dtype) for t in self.cpu.values())
        if gpu_ffn != acct.gpu["ffn_hot"] or cpu_ffn != acct.cpu["ffn_cold"]:
            raise IncompatibleError(f"bundle {self.path}: FFN tensors hold {gpu_ffn} + {cpu_ffn} bytes, the memory "
                                    f"account says {acct.gpu['ffn_hot']} + {acct.cpu['ffn_cold']}", "re-export the bundle")


def _load_checked(p: Path, shapes: dict[str, tuple[int, ...]], dtype: str, fingerprint: str) -> dict[str, Any]:
    header, _ = fmt.read_header(p)
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
    for n, shape in shapes.items():
        rec = header[n]
        if tuple(rec["shape"]) != tuple(shape) or fmt.ST_DTYPES_INV.get(rec["dtype"]) != dtype:
            raise IncompatibleError(f"bundle {p.parent}: {p.name} has {n} {rec['dtype']} {rec['shape']}, the manifest's "
                                    f"model and placement need {dtype} {list(shape)}", "re-export the bundle")
    return fmt.mmap_tensors(p)


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
    m = read_manifest(path, fmt.KIND, (fmt.FORMAT_VERSION,))
    if m.get("manifest_sha256") != fmt.manifest_digest(m):
        raise IncompatibleError(f"bundle {path}: {MANIFEST} was altered (its recorded sha256 does not match)",
                                "re-export the bundle")
    return m
