"""Per-layer activation predictors (Deja Vu / PowerInfer style): x -> Linear(D, r) -> ReLU -> Linear(r, F).

Trained on the Profile's sampled FFN inputs x. Labels are not the profile's masks but the bundle's own
activation rule at the bundle's thresholds, recomputed from x and this layer's weights, so the predictor
predicts exactly what `threshold` mode would compute.

Sizing per layer: candidate ranks are tried from small to large; each is trained, and its decision
threshold is set on a validation part of the training samples so that recall reaches the target (plus a
margin). A larger rank is kept only if it cuts the fraction of neurons the predictor selects by more
than `size_tolerance` (selecting fewer neurons at the same recall is what a better predictor buys).

Export: one ONNX file per layer (x [batch, D] float32 -> logits [batch, F] float32, outputs in bundle
order), built with onnx.helper (Gemm, Relu, Gemm), checked with onnx.checker and against torch with
onnxruntime. Recall and precision are measured on held-out data: a second profile of other prompts when
given, else a held-out fraction of the profile's sampled tokens (the same prompts: said so in the report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.errors import InputError
from hotcold.exporter import thresholds as th
from hotcold.model.config import ModelConfig

OPSET = 17
IR_VERSION = 9  # what onnxruntime >= 1.16 reads
ONNX_ATOL = 1e-5
ONNX_RTOL = 1e-5


@dataclass(frozen=True)
class PredictorOptions:
    target_recall: float = 0.9
    ranks: tuple[int, ...] = ()  # candidates, ascending; () -> dim/16, dim/8, dim/4 (within [16, 1024])
    epochs: int = 30
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15  # of the training samples: decision threshold and rank choice
    heldout_fraction: float = 0.2  # of the profile's samples, when no held-out profile is given
    recall_margin: float = 0.02  # decision threshold aims at target_recall + margin on validation
    size_tolerance: float = 0.02  # a bigger rank must cut the selected fraction by more than this
    seed: int = 0

    def candidate_ranks(self, cfg: ModelConfig) -> list[int]:
        if self.ranks:
            return sorted({int(r) for r in self.ranks})
        return sorted({int(min(1024, max(16, cfg.dim // d))) for d in (16, 8, 4)})

    def validate(self) -> None:
        if not 0.0 < self.target_recall < 1.0:
            raise InputError(f"target recall {self.target_recall} must be in (0, 1)", "pass e.g. 0.9")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("predictor epochs and batch size must be >= 1", "pass e.g. --predictor-epochs 30")


class LowRankMLP(torch.nn.Module):
    def __init__(self, dim: int, rank: int, n_out: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, rank)
        self.fc2 = torch.nn.Linear(rank, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w1": self.fc1.weight.detach().numpy().copy(), "b1": self.fc1.bias.detach().numpy().copy(),
                "w2": self.fc2.weight.detach().numpy().copy(), "b2": self.fc2.bias.detach().numpy().copy()}


def forward_arrays(w: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    t = {k: torch.from_numpy(np.array(v)) for k, v in w.items()}
    return F.linear(F.relu(F.linear(x, t["w1"], t["b1"])), t["w2"], t["b2"])


def train(x: torch.Tensor, y: torch.Tensor, rank: int, opts: PredictorOptions) -> LowRankMLP:
    """Fit one predictor: x [n, D] float32, y [n, F] bool."""
    g = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    model = LowRankMLP(x.shape[1], rank, y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps = opts.epochs * math.ceil(len(x) / opts.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=max(steps, 1))
    yf = y.float()
    with torch.enable_grad():
        for _ in range(opts.epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), opts.batch_size):
                b = perm[s:s + opts.batch_size]
                loss = F.binary_cross_entropy_with_logits(model(x[b]), yf[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def decision_threshold(logits: torch.Tensor, y: torch.Tensor, recall: float) -> float:
    """The logit threshold at which a fraction `recall` of the positives is predicted active."""
    pos = logits[y]
    if pos.numel() == 0:
        return float("inf")
    return float(np.quantile(pos.double().numpy(), 1.0 - min(recall, 1.0)))


def metrics(logits: torch.Tensor, y: torch.Tensor, threshold: float) -> dict[str, float]:
    pred = logits > threshold
    tp = int((pred & y).sum())
    n_pred, n_pos = int(pred.sum()), int(y.sum())
    return {"recall": tp / n_pos if n_pos else 1.0, "precision": tp / n_pred if n_pred else 1.0,
            "selected_fraction": n_pred / y.numel(), "active_fraction": n_pos / y.numel(), "tokens": int(y.shape[0])}


def to_onnx(w: dict[str, np.ndarray], layer: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    D, F_ = w["w1"].shape[1], w["w2"].shape[0]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", F_])
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
             helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"], transB=1, name="fc2")]
    inits = [numpy_helper.from_array(np.ascontiguousarray(w[n], dtype=np.float32), n) for n in ("w1", "b1", "w2", "b2")]
    graph = helper.make_graph(nodes, f"hotcold_predictor_layer_{layer}", [x], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hotcold")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def check_onnx(path: Path, w: dict[str, np.ndarray], x: torch.Tensor) -> dict[str, float]:
    """onnx.checker on the file, then onnxruntime vs torch on `x`; raises if they differ beyond 1e-5."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"x": x.numpy()})
    want = forward_arrays(w, x).numpy()
    diff = np.abs(got - want)
    ok = bool(np.all(diff <= ONNX_ATOL + ONNX_RTOL * np.abs(want)))
    res = {"max_abs_diff": float(diff.max()) if diff.size else 0.0,
           "max_rel_diff": float((diff / np.maximum(np.abs(want), 1e-30)).max()) if diff.size else 0.0,
           "max_abs_logit": float(np.abs(want).max()) if want.size else 0.0, "rows": int(x.shape[0]), "ok": ok}
    if not ok:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch by {res['max_abs_diff']:.3g} "
                             f"(tolerance {ONNX_ATOL} + {ONNX_RTOL}·|logit|)")
    return res


def export_layer_predictor(layer: int, cfg: ModelConfig, gate: torch.Tensor, up: torch.Tensor, perm: torch.Tensor,
                           rule: str, threshold: float, profile: Any, heldout: Any, opts: PredictorOptions,
                           path: Path) -> dict[str, Any]:
    """Train, size, export and check the predictor of one layer; return its report entry."""
    opts.validate()
    x_all = th.sample_inputs(profile, layer)
    if heldout is not None:
        x_train, x_test = x_all, th.sample_inputs(heldout, layer)
        held = f"held-out profile ({getattr(heldout, 'path', None) or 'given'})"
    else:
        n_test = max(1, int(round(len(x_all) * opts.heldout_fraction)))
        x_train, x_test = x_all[:-n_test], x_all[-n_test:]
        held = f"the last {opts.heldout_fraction:.0%} of the profile's sampled tokens (prompts shared with training)"
    n_val = max(1, int(round(len(x_train) * opts.val_fraction)))
    if len(x_train) - n_val < 16:
        raise InputError(f"only {len(x_train)} sampled tokens to train layer {layer}'s predictor on",
                         "re-profile with more --samples (e.g. 4096)")
    x_fit, x_val = x_train[:-n_val], x_train[-n_val:]

    def labels(x: torch.Tensor) -> torch.Tensor:
        # bundle order: column j is neuron perm[j] (hot first, then cold)
        return (th.magnitudes(rule, cfg.activation, x, gate, up) > threshold)[:, perm]

    y_fit, y_val, y_test = labels(x_fit), labels(x_val), labels(x_test)
    aim = min(opts.target_recall + opts.recall_margin, 0.999)
    tried = []
    best = None
    for rank in opts.candidate_ranks(cfg):
        model = train(x_fit, y_fit, rank, opts)
        with torch.no_grad():
            lv = model(x_val)
        thr = decision_threshold(lv, y_val, aim)
        m = metrics(lv, y_val, thr)
        tried.append({"rank": rank, "validation": m, "decision_threshold": thr})
        if best is None or m["selected_fraction"] < best[2]["selected_fraction"] - opts.size_tolerance:
            best = (rank, model, m, thr)
        else:
            break
    rank, model, val_m, thr = best
    w = model.arrays()
    to_onnx(w, layer, path)
    check = check_onnx(path, w, x_test[:256].contiguous())
    with torch.no_grad():
        lt = forward_arrays(w, x_test)
    return {"layer": layer, "rank": rank, "decision_threshold": thr, "validation": val_m,
            "heldout": metrics(lt, y_test, thr), "heldout_source": held, "onnx_check": check, "tried": tried,
            "train_tokens": int(len(x_fit))}
