"""`export_bundle()`: a model + a Placement (+ the Profile) -> a Bundle directory (format.py).

Streaming: the three safetensors files are declared up front (every shape follows from the model config
and the placement's n_hot) and filled one layer at a time, so only one layer's weights (plus the
embedding) are ever resident. Everything is written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hotcold.artifacts import atomic_dir, file_record, sha256_json, write_manifest
from hotcold.devices import torch_dtypes
from hotcold.errors import IncompatibleError, InputError
from hotcold import bundle as fmt
from hotcold.exporter import thresholds as th
from hotcold.exporter.stwriter import StreamingWriter
from hotcold.memory import canonical_dtype, dense_bytes, embedding_dtype, placement_bytes, quant_format, small_dtype
from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource
from hotcold.quant import hcat

TORCH_DTYPES = torch_dtypes()  # canonical name -> torch dtype (hotcold.devices)
EXPORT_DTYPES = tuple(TORCH_DTYPES) + ("q4", "q8", "q4a", "q8a")  # quantized: any hotcold.quant format name


@dataclass(frozen=True)
class ExportOptions:
    """How to export. Thresholds: `threshold` (one value or one per layer) wins over `sparsity`."""

    dtype: str = "float32"
    rule: str = "product"  # activation rule of threshold / predictor modes (format.py)
    cpu_layout: str = fmt.DEFAULT_LAYOUT  # auto | bundled | split (format.py; auto: split for product, bundled for gate)
    sparsity: float | None = 0.5  # target fraction of inactive neurons per layer, t_l calibrated from the profile
    threshold: float | tuple[float, ...] | None = None  # absolute t_l (one, or per layer)
    phase: str = "decode"  # histogram phase for the product rule
    predictors: bool = False
    predictor: Any = None  # PredictorOptions (predictors.py); None: defaults
    ctx_len: int | None = None  # context the memory account is sized for; None: the placement's, else 4096

    def to_json(self) -> dict[str, Any]:
        d = asdict(self) if self.predictor is None else {**asdict(self), "predictor": asdict(self.predictor)}
        if isinstance(d.get("threshold"), tuple):
            d["threshold"] = list(d["threshold"])
        return d


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float
    predictor_report: list[dict[str, Any]] = field(default_factory=list)


def _placement_arrays(placement: Any, cfg: ModelConfig) -> tuple[np.ndarray, list[int]]:
    where = getattr(placement, "path", None) or "the placement"
    order = np.asarray(placement.order).astype(np.int64)
    n_hot = [int(k) for k in np.asarray(placement.n_hot)]
    if order.shape != (cfg.n_layers, cfg.n_ff) or len(n_hot) != cfg.n_layers:
        raise IncompatibleError(f"{where} has order {tuple(order.shape)} / n_hot [{len(n_hot)}], the model needs "
                                f"[{cfg.n_layers}, {cfg.n_ff}] / [{cfg.n_layers}]", "solve for this model")
    if any(k < 0 or k > cfg.n_ff for k in n_hot):
        raise IncompatibleError(f"{where}: n_hot outside [0, {cfg.n_ff}]", "re-create it with `hotcold solve`")
    ref = np.arange(cfg.n_ff)
    for layer in range(cfg.n_layers):
        if not np.array_equal(np.sort(order[layer]), ref):
            raise IncompatibleError(f"{where}: order of layer {layer} is not a permutation of the layer's neurons",
                                    "re-create it with `hotcold solve`")
    return order, n_hot


def _check_same_model(what: str, obj: Any, src: WeightSource) -> None:
    where = getattr(obj, "path", None) or f"the {what}"
    cfg = obj.model_config
    if cfg.shape_key() != src.config.shape_key():
        raise IncompatibleError(f"{what} {where} is for a model of shape {cfg.shape_key()}, but {src.description} "
                                f"has {src.config.shape_key()}", f"use a {what} made for this model")
    fp = getattr(obj, "fingerprint", "unknown")
    if fp not in ("unknown", None) and fp != src.fingerprint:
        raise IncompatibleError(f"{what} {where} was made for model fingerprint {fp}, not {src.description} "
                                f"({src.fingerprint})", f"use a {what} made for this model, or re-run it")


def bundle_account(cfg: ModelConfig, n_hot: list[int], dtype: str, ctx_len: int,
                   predictor_ranks: list[int] | None = None):
    """The memory account of a bundle (hotcold.memory), with per-layer predictor sizes when present.

    Predictors are stored and run in float32 (onnxruntime's CPU kernels), so they are accounted so."""
    return placement_bytes(cfg, n_hot, dtype, ctx_len=ctx_len, cold_mode="threshold",
                           predictor_rank=list(predictor_ranks) if predictor_ranks else None, predictor_dtype="float32")


def _check_written_bytes(cfg: ModelConfig, n_hot: list[int], dtype: str, records: dict[str, dict], acct) -> None:
    """What was written must be what hotcold.memory says a bundle holds (one accounting, checked twice)."""
    def nbytes(rec: dict, leaves: tuple[str, ...] | None, exclude: tuple[str, ...] = ()) -> int:
        """Bytes as stored in the file (a quantized matrix: its uint8 rows, scales included)."""
        total = 0
        for name, t in rec["tensors"].items():
            leaf = name.rsplit(".", 1)[-1]
            if (leaves is None or leaf in leaves) and leaf not in exclude:
                total += int(np.prod(t["shape"], dtype=np.int64)) * fmt.ITEMSIZE[t["dtype"]]
        return total

    gpu_ffn = nbytes(records[fmt.GPU_FILE], fmt.FFN_GPU)
    gpu_dense = nbytes(records[fmt.GPU_FILE], None, fmt.FFN_GPU)
    cpu_ffn = nbytes(records[fmt.CPU_FILE], fmt.FFN_CPU)
    d = dense_bytes(cfg, dtype)
    if gpu_ffn != acct.gpu["ffn_hot"] or cpu_ffn != acct.cpu["ffn_cold"] or gpu_dense != d.total:
        raise AssertionError(f"bundle bytes disagree with hotcold.memory: gpu ffn {gpu_ffn} vs {acct.gpu['ffn_hot']}, "
                             f"cpu ffn {cpu_ffn} vs {acct.cpu['ffn_cold']}, dense {gpu_dense} vs {d.total}")


def export_bundle(source: WeightSource | str, placement: Any, out: str | Path, profile: Any = None,
                  options: ExportOptions | None = None, heldout: Any = None,
                  log: Callable[[str], None] = lambda s: None,
                  progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the Bundle for `placement` of `source` to `out` (atomically).

    profile: the Profile the thresholds (and predictors) are calibrated on; optional when thresholds are
    given or only `exact` mode will be used. heldout: a second Profile of other prompts on which
    predictors are evaluated (else a held-out fraction of `profile`'s samples, reported as such).
    """
    t0 = time.perf_counter()
    opts = options or ExportOptions()
    if isinstance(source, (str, Path)):
        from hotcold.model.registry import load_source

        source = load_source(source)
    src = source
    cfg = src.config
    dtype = canonical_dtype(opts.dtype)
    qfmt = quant_format(dtype)
    if dtype not in TORCH_DTYPES and qfmt is None:
        raise InputError(f"the exporter writes {', '.join(EXPORT_DTYPES)}, not {dtype}", "pass --dtype fp32, bf16, fp16 or q4")
    # quantized: matrices are packed rows; the float parts (norms, biases) are float32, the embedding float16
    tdt = TORCH_DTYPES[dtype] if qfmt is None else TORCH_DTYPES[small_dtype(dtype)]
    edt = TORCH_DTYPES[embedding_dtype(dtype)]
    rule = th.check_rule(opts.rule)
    if qfmt is not None:
        # the quantized cold kernel (hotcold.runtime.qkernels) reads the bundled layout only
        if opts.cpu_layout == "split":
            raise InputError(f"a {dtype} bundle has the bundled CPU layout (the quantized cold kernel's), not split",
                             "pass --cpu-layout bundled (or auto), or a float --dtype")
        layout = "bundled"
    else:
        layout = fmt.layout_for(opts.cpu_layout, rule)
    if layout not in fmt.CPU_LAYOUTS:
        raise InputError(f"unknown CPU layout {layout!r}", f"use one of: auto, {', '.join(fmt.CPU_LAYOUTS)}")
    _check_same_model("placement", placement, src)
    if profile is not None:
        _check_same_model("profile", profile, src)
    if heldout is not None:
        _check_same_model("held-out profile", heldout, src)
    order, n_hot = _placement_arrays(placement, cfg)
    pman = getattr(placement, "manifest", {}) or {}
    ctx_len = int(opts.ctx_len or pman.get("ctx_len") or min(cfg.max_seq_len, 4096))

    # ---- activation thresholds (known up front, or calibrated per layer in the loop) -------------
    thresholds: list[float] | None = None
    t_source = None
    if opts.threshold is not None:
        thresholds, t_source = th.given_thresholds(opts.threshold, cfg.n_layers), "given"
    elif opts.sparsity is not None and profile is not None:
        if not 0.0 <= opts.sparsity < 1.0:
            raise InputError(f"--sparsity must be in [0, 1), got {opts.sparsity}", "pass a fraction such as 0.5")
        if rule == "product":
            thresholds, t_source = th.from_histograms(profile, opts.sparsity, opts.phase), "profile histograms"
        else:
            th.sample_inputs(profile, 0)  # fail early when the profile has no samples
            thresholds, t_source = [0.0] * cfg.n_layers, "profile samples (exact quantile of |act(gate)|)"
    if opts.predictors:
        if thresholds is None:
            raise InputError("predictors are trained to predict the threshold rule's active neurons, but no "
                             "thresholds were given", "pass --profile with --sparsity, or --threshold")
        th.sample_inputs(profile, 0)
    predictor_opts = None
    if opts.predictors:
        from hotcold.exporter.predictors import PredictorOptions

        predictor_opts = opts.predictor or PredictorOptions()

    tok = src.tokenizer()
    out = Path(out)
    gpu_specs = fmt.stored_tensors(fmt.gpu_tensor_shapes(cfg, n_hot), dtype)
    cpu_specs = fmt.stored_tensors(fmt.cpu_tensor_shapes(cfg, n_hot, layout), dtype)
    qsrc = None
    qrec: dict[str, dict[str, Any]] = {}  # name -> QTensor.meta() + provenance of each part
    if qfmt is not None:
        from hotcold.exporter.qexport import QuantSource

        qsrc = QuantSource(src, qfmt)

    def packed(name: str, parts: dict[str, Any]) -> list[torch.Tensor]:
        """Record a quantized tensor made of row blocks {part: (QTensor, provenance)}; its row blocks."""
        qts = [q for q, _ in parts.values()]
        qrec[name] = {"format": qfmt.name, "bits": qfmt.bits, "group": qfmt.group, "asym": qfmt.asym,
                      "shape": [sum(q.shape[0] for q in qts), qts[0].shape[1]],
                      "provenance": {k: how for k, (_, how) in parts.items()}}
        return [q.packed for q in qts]
    idx_specs = {n: ("int32", s) for n, s in fmt.neuron_tensor_shapes(cfg, n_hot).items()}
    meta = {"format": "hotcold bundle", "model_fingerprint": str(src.fingerprint)}
    report: list[dict[str, Any]] = []
    ranks: list[int] = []
    pred_layers: list[dict[str, Any]] = []

    with atomic_dir(out) as tmp, torch.no_grad():
        writers = {fmt.GPU_FILE: StreamingWriter(tmp / fmt.GPU_FILE, gpu_specs, meta),
                   fmt.CPU_FILE: StreamingWriter(tmp / fmt.CPU_FILE, cpu_specs, meta),
                   fmt.NEURONS_FILE: StreamingWriter(tmp / fmt.NEURONS_FILE, idx_specs, meta)}
        try:
            gw, cw, nw = (writers[k] for k in (fmt.GPU_FILE, fmt.CPU_FILE, fmt.NEURONS_FILE))
            gw.write("tok_embeddings", src.embedding(edt))
            gw.write("norm", src.get("norm", tdt))
            if not cfg.tie_embeddings:
                if qsrc is None:
                    gw.write("output", src.lm_head(tdt))
                else:
                    gw.write("output", packed("output", {"output": qsrc.matrix("output", src.lm_head(torch.float32))}))
            if predictor_opts is not None:
                (tmp / fmt.PREDICTOR_DIR).mkdir()
            scratch: dict[str, torch.Tensor] = {}
            for i in range(cfg.n_layers):
                t = src.layer(i, torch.float32)
                k = n_hot[i]
                perm = torch.from_numpy(order[i])
                hot, cold = perm[:k], perm[k:]
                # [F, D] each; down_t row n = neuron n's down column (one transpose per layer, then row gathers)
                gate, up, down_t = t["w_gate"], t["w_up"], t["w_down"].t().contiguous()

                def rows(w: torch.Tensor, idx: torch.Tensor, slot: str) -> torch.Tensor:
                    """w[idx] gathered into a buffer reused across layers (no fresh allocation per layer)."""
                    n = idx.numel() * w.shape[1]
                    if scratch.get(slot) is None or scratch[slot].numel() < n:
                        scratch[slot] = torch.empty(n, dtype=w.dtype)
                    out = torch.index_select(w, 0, idx, out=scratch[slot][:n].view(idx.numel(), w.shape[1]))
                    return out.to(tdt)

                gw.write(f"layers.{i}.attn_norm", t["attn_norm"].to(tdt))
                if qsrc is not None:
                    p = f"layers.{i}."
                    q = {k2: qsrc.matrix(p + k2, t[k2]) for k2 in ("wq", "wk", "wv", "wo", "w_gate", "w_up")}
                    q["w_down"] = qsrc.matrix(p + "w_down", t["w_down"], transpose=True)  # [F, D]: rows by neuron
                    gw.write(p + "wqkv", packed(p + "wqkv", {k2: q[k2] for k2 in ("wq", "wk", "wv")}))
                    if cfg.qkv_bias:
                        gw.write(p + "bqkv", [t["bq"].to(tdt), t["bk"].to(tdt), t["bv"].to(tdt)])
                    gw.write(p + "wo", packed(p + "wo", {"wo": q["wo"]}))
                    gw.write(p + "ffn_norm", t["ffn_norm"].to(tdt))

                    def sel(k2: str, idx: torch.Tensor) -> tuple[Any, str]:
                        return q[k2][0].take_rows(idx), q[k2][1]

                    gw.write(p + "hot_gate_up", packed(p + "hot_gate_up", {"w_gate": sel("w_gate", hot),
                                                                           "w_up": sel("w_up", hot)}))
                    gw.write(p + "hot_down", packed(p + "hot_down", {"w_down": sel("w_down", hot)}))
                    cw.write(p + "cold_gate", packed(p + "cold_gate", {"w_gate": sel("w_gate", cold)}))
                    (cu, hu), (cd, hd) = sel("w_up", cold), sel("w_down", cold)
                    ud = hcat(cu, cd)  # row j = [up_j | down_j] in the format's byte order (quant.hcat)
                    cw.write(p + "cold_up_down", packed(p + "cold_up_down", {"w_up_down": (ud, hu)}))
                    qrec[p + "cold_up_down"]["provenance"] = {"w_up": hu, "w_down": hd}
                    del q, ud
                else:
                    gw.write(f"layers.{i}.wqkv", [t["wq"].to(tdt), t["wk"].to(tdt), t["wv"].to(tdt)])
                    if cfg.qkv_bias:
                        gw.write(f"layers.{i}.bqkv", [t["bq"].to(tdt), t["bk"].to(tdt), t["bv"].to(tdt)])
                    gw.write(f"layers.{i}.wo", t["wo"].to(tdt))
                    gw.write(f"layers.{i}.ffn_norm", t["ffn_norm"].to(tdt))
                    gw.write(f"layers.{i}.hot_gate_up", [rows(gate, hot, "a"), rows(up, hot, "b")])
                    gw.write(f"layers.{i}.hot_down", rows(down_t, hot, "a"))
                    if layout == "bundled":
                        cw.write(f"layers.{i}.cold_gate", rows(gate, cold, "a"))
                        cw.write(f"layers.{i}.cold_up_down",
                                 torch.cat([rows(up, cold, "a"), rows(down_t, cold, "b")], dim=1))
                    else:
                        cw.write(f"layers.{i}.cold_gate_up_t",
                                 torch.cat([rows(gate, cold, "a"), rows(up, cold, "b")]).t())
                        cw.write(f"layers.{i}.cold_down", rows(down_t, cold, "a"))
                nw.write(f"layers.{i}.hot", hot.to(torch.int32))
                nw.write(f"layers.{i}.cold", cold.to(torch.int32))
                if thresholds is not None and t_source is not None and t_source.startswith("profile samples"):
                    x = th.sample_inputs(profile, i)
                    thresholds[i] = th.quantile(th.magnitudes("gate", cfg.activation, x, gate), opts.sparsity)
                if predictor_opts is not None:
                    from hotcold.exporter.predictors import export_layer_predictor

                    rec = export_layer_predictor(i, cfg, gate, up, perm, rule, thresholds[i], profile, heldout,
                                                 predictor_opts, tmp / fmt.predictor_file(i))
                    ranks.append(rec["rank"])
                    report.append(rec)
                    pred_layers.append({k2: rec[k2] for k2 in ("layer", "rank", "decision_threshold")})
                    log(f"layer {i}: predictor rank {rec['rank']}, held-out recall {rec['heldout']['recall']:.3f} "
                        f"precision {rec['heldout']['precision']:.3f}")
                del t, gate, up, down_t
                if progress:
                    progress(i + 1, cfg.n_layers)
            records = {name: w.close() for name, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

        acct = bundle_account(cfg, n_hot, dtype, ctx_len, ranks or None)
        _check_written_bytes(cfg, n_hot, dtype, records, acct)
        files = [{"path": name, **rec, "dtype": dtype if name != fmt.NEURONS_FILE else "int32"}
                 for name, rec in records.items()]
        tok_entry = None
        if tok is not None:
            (tmp / fmt.TOKENIZER_FILE).write_text(tok.tk.to_str())
            files.append(file_record(tmp, fmt.TOKENIZER_FILE))
            tok_entry = {"file": fmt.TOKENIZER_FILE, "bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids),
                         "add_bos": bool(tok.add_bos), "chat_template": tok.chat_template}
        predictors_entry = None
        if predictor_opts is not None:
            for i in range(cfg.n_layers):
                files.append(file_record(tmp, fmt.predictor_file(i), dtype="float32",
                                         inputs={"x": ["batch", cfg.dim]}, outputs={"logits": ["batch", cfg.n_ff]}))
            predictors_entry = {"format": "onnx", "output_order": "bundle (hot first, then cold)",
                                "input": "FFN input (after ffn_norm), float32", "rule": rule,
                                "options": asdict(predictor_opts), "layers": pred_layers,
                                "report": report}
        summary = placement_summary(placement, n_hot, cfg)
        body = {
            "model": {"fingerprint": src.fingerprint, "source": src.description, "config": cfg.to_json()},
            "dtype": dtype,
            "quant": None if qfmt is None else {
                "format": qfmt.name, "bits": qfmt.bits, "group": qfmt.group, "asym": qfmt.asym,
                "bits_per_weight": qfmt.bits_per_weight,
                "embedding": embedding_dtype(dtype), "small": small_dtype(dtype),
                "note": "tok_embeddings is stored in float16 (a row lookup per token), norms and biases in float32; "
                        "every other matrix is quantized (tensors: QTensor.meta() and where each part came from)",
                "source": "gguf" if qsrc.gguf else "float weights", "tensors": qrec},
            "cpu_layout": layout,
            "ctx_len": ctx_len,
            "tokenizer": tok_entry,
            "placement": {"content_hash": getattr(placement, "content_hash", None),
                          "path": str(getattr(placement, "path", None) or "") or None,
                          "n_hot": n_hot, "summary": summary},
            "profile": None if profile is None else {"content_hash": profile.content_hash,
                                                      "path": str(profile.path) if profile.path else None,
                                                      "activation": profile.manifest.get("activation")},
            "heldout_profile": None if heldout is None else {"content_hash": heldout.content_hash,
                                                              "path": str(heldout.path) if heldout.path else None},
            "activation": None if thresholds is None else {
                "rule": rule, "thresholds": [float(v) for v in thresholds],
                "target_sparsity": None if opts.threshold is not None else opts.sparsity, "source": t_source},
            "memory": {**acct.to_json(), "ffn_gpu_per_layer": acct.ffn_gpu_per_layer,
                       "ffn_cpu_per_layer": acct.ffn_cpu_per_layer, "ctx_len": ctx_len},
            "predictors": predictors_entry,
            "export": {"seconds": round(time.perf_counter() - t0, 3), "options": opts.to_json()},
            "files": files,
        }
        manifest = fmt.seal_manifest(tmp, write_manifest(tmp, fmt.KIND, fmt.FORMAT_VERSION, body))
    return ExportResult(path=out, manifest=manifest, seconds=time.perf_counter() - t0, predictor_report=report)


def placement_summary(placement: Any, n_hot: list[int], cfg: ModelConfig) -> dict[str, Any]:
    """The placement's own summary when it has one, plus the counts every bundle reader wants."""
    base: dict[str, Any] = {}
    if hasattr(placement, "summary"):
        try:
            base = dict(placement.summary())
        except (KeyError, TypeError):  # a hand-built placement without a solver manifest
            base = {}
    total = cfg.n_layers * cfg.n_ff
    base.update(n_hot_total=int(sum(n_hot)), n_ff_total=total, hot_fraction_neurons=sum(n_hot) / total)
    return base


def bundle_id(manifest: dict[str, Any]) -> str:
    """A short id of a bundle's content (its file hashes and configuration)."""
    return sha256_json({k: v for k, v in manifest.items() if k not in ("export", "producer")})[:16]
