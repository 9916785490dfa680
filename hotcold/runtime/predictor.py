"""Run a bundle's per-layer predictors (ONNX, exported by hotcold/exporter/predictors.py).

Backends: `torch` reads the ONNX initializers (w1 [r, D], b1 [r], w2 [F, r], b2 [F]) and runs the same
two layers on the GPU side's device; `onnxruntime` runs the files as they are (CPU). Both return the
cold neurons' logits only (the outputs are in bundle order: hot first, then cold).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.errors import IncompatibleError, InputError
from hotcold.exporter import format as fmt

BACKENDS = ("torch", "onnxruntime")


def read_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf decode errors
        raise IncompatibleError(f"{path} is not a readable ONNX model ({e})", "re-export the bundle") from None
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if set(w) != {"w1", "b1", "w2", "b2"}:
        raise IncompatibleError(f"{path} is not a hotcold predictor (initializers {sorted(w)})", "re-export the bundle")
    return w


class Predictors:
    def __init__(self, bundle: Any, device: torch.device, backend: str = "torch"):
        if backend not in BACKENDS:
            raise InputError(f"unknown predictor backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
        entry = bundle.predictors
        if not entry:
            raise InputError(f"bundle {bundle.path} has no predictors", "re-export with --predictors, or use "
                             "--mode threshold or exact")
        self.backend = backend
        self.device = device
        cfg = bundle.config
        n_hot = bundle.n_hot
        self.decision = [float(rec["decision_threshold"]) for rec in entry["layers"]]
        self.ranks = [int(rec["rank"]) for rec in entry["layers"]]
        self.layers: list[Any] = []
        for i in range(cfg.n_layers):
            path = bundle.path / fmt.predictor_file(i)
            k = n_hot[i]
            if backend == "torch":
                w = read_weights(path)
                self.layers.append(tuple(torch.from_numpy(np.array(w[n])).to(device) for n in ("w1", "b1")) +
                                   tuple(torch.from_numpy(np.array(w[n][k:])).to(device) for n in ("w2", "b2")))
            else:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = torch.get_num_threads()
                self.layers.append((ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), k))

    def cold_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] (FFN input) -> logits of the layer's cold neurons [N, c], float32."""
        if self.backend == "torch":
            w1, b1, w2, b2 = self.layers[layer]
            return F.linear(F.relu(F.linear(x.float(), w1, b1)), w2, b2)
        sess, k = self.layers[layer]
        (out,) = sess.run(["logits"], {"x": x.float().cpu().numpy()})
        return torch.from_numpy(out[:, k:]).to(x.device)

    def cold_active(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[N, c] bool: the cold neurons predicted active."""
        return self.cold_logits(layer, x) > self.decision[layer]
