"""The Bundle's ONNX predictors as the model's predictor-mode selector (design.md §5, hotcold.runtime.selectors).

Per layer l a low-rank MLP, x [N, D] float32 -> logits [N, n_ff] (Linear -> ReLU -> Linear), whose
outputs are in the Bundle's neuron order (its hot neurons, then its cold ones); a neuron is predicted
active when its logit exceeds the layer's decision threshold. The weights are read from the ONNX files
(initializers w1, b1, w2, b2) and evaluated on the GPU side in torch; `backend="onnxruntime"` runs the
ONNX files themselves on the CPU instead (the reference the torch evaluation is checked against).

Decisions are looked up by neuron id (through each slot's id), so they stay right after dynamic
migration moves neurons between slots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.errors import IncompatibleError, InputError
from hotcold import bundle as fmt

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


class BundlePredictors:
    def __init__(self, bundle: Any, device: torch.device, backend: str = "torch"):
        if backend not in BACKENDS:
            raise InputError(f"unknown predictor backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
        entry = bundle.predictors
        if not entry:
            raise InputError(f"bundle {bundle.path} has no predictors", "re-export with --predictors, or use "
                             "--cold-mode threshold or exact")
        self.backend = backend
        self.device = device
        cfg = bundle.config
        L, n_ff = cfg.n_layers, cfg.n_ff
        self.decision = torch.tensor([float(rec["decision_threshold"]) for rec in entry["layers"]],
                                     dtype=torch.float32, device=device)
        self.ranks = [int(rec["rank"]) for rec in entry["layers"]]
        # column of neuron id n in layer l's outputs: the bundle order is hot ids, then cold ids
        self.col = []
        for l in range(L):
            order = np.concatenate([bundle.hot_index(l).numpy(), bundle.cold_index(l).numpy()]).astype(np.int64)
            col = np.empty(n_ff, dtype=np.int64)
            col[order] = np.arange(n_ff)
            self.col.append(torch.from_numpy(col).to(device))
        self.w: list[tuple[torch.Tensor, ...]] = []
        self.sessions: list[Any] = []
        for l in range(L):
            path = bundle.path / fmt.predictor_file(l)
            if backend == "torch":
                w = read_weights(path)
                self.w.append(tuple(torch.from_numpy(np.array(w[n])).to(device).float() for n in ("w1", "b1", "w2", "b2")))
            else:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = torch.get_num_threads()
                self.sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
        self.logits = torch.zeros(L, n_ff, dtype=torch.float32, device=device)
        self.on = torch.zeros(L, n_ff, dtype=torch.bool, device=device)

    def layer_logits(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> logits [N, n_ff] in the bundle's neuron order, float32."""
        if self.backend == "torch":
            w1, b1, w2, b2 = self.w[l]
            return F.linear(F.relu(F.linear(x.float(), w1, b1)), w2, b2)
        (out,) = self.sessions[l].run(["logits"], {"x": x.detach().float().cpu().numpy()})
        return torch.from_numpy(out).to(x.device)

    def _decide(self, eng, l: int, x: torch.Tensor) -> None:
        self.logits[l].copy_(self.layer_logits(l, x.view(1, -1))[0])
        self.on[l].copy_(self.logits[l] > self.decision[l])

    def cold_mask(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        """uint8 [C]: 1 for the cold slots predicted active (one decode token)."""
        self._decide(eng, l, x)
        return self.on[l].index_select(0, self.col[l].index_select(0, eng.cold_ids_dev[l])).to(torch.uint8)

    def hot_active(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        """The decisions for the hot slots (from the same logits as cold_mask's)."""
        return self.on[l].index_select(0, self.col[l].index_select(0, eng.hot_ids_dev[l])).float()

    def cold_mask_batch(self, eng, l: int, x: torch.Tensor) -> torch.Tensor:
        """bool [N, C]: the cold slots predicted active for each of N tokens (batched forward)."""
        logits = self.layer_logits(l, x)
        cols = self.col[l].index_select(0, eng.cold_ids_dev[l])
        return logits.index_select(1, cols) > self.decision[l]

    def gpu_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.w for t in w)

    def bytes_per_token(self) -> int:
        return self.gpu_bytes()
