"""The Placement artifact (design.md §2): which neurons of each layer live on the GPU, and why.

Directory layout (format version 1):
    manifest.json          kind "placement", format_version, producer, and:
                           policy {name, parameters}, solver {status, objective, bound, gap, seconds, ...},
                           model {fingerprint, config}, profile {content_hash, path, phase, token_count},
                           hardware (the whole HardwareSpec), budgets {gpu_bytes, cpu_bytes},
                           cold_mode (threshold | predictor | exact), dtype, ctx_len, cost_model {...},
                           memory {gpu {...}, cpu {...}, gpu_total, cpu_total}   (hotcold.memory account),
                           layers [{layer, n_hot, hot_fraction, tau, min_hot, gpu_bytes, cpu_bytes,
                                    gpu_share, time_ms {pre, gpu, cpu, sync, host, total}, regime}],
                           totals {...}, files [...]
    placement.safetensors  order [n_layers, n_ff] int32: each layer's neuron indices sorted by profiled
                                 frequency, descending, ties by index
                           n_hot [n_layers] int32: the hot set of layer l is order[l, :n_hot[l]]

time_ms.host (host overhead per split layer, hotcold.solver.hardware) is absent from placements written
before it existed; readers take it as 0.

tau is the frequency of the layer's coldest hot neuron (null when none is hot): every neuron with f > tau
is hot, every neuron with f < tau is cold; neurons whose f equals tau are split by index in `order`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hotcold.artifacts import ModelArtifact, atomic_dir, file_record, read_manifest, verify_files, write_manifest
from hotcold.errors import IncompatibleError
from hotcold.model.config import ModelConfig

KIND = "placement"
FORMAT_VERSION = 1
TENSORS = "placement.safetensors"


@dataclass(frozen=True)
class Placement(ModelArtifact):
    manifest: dict[str, Any]
    order: np.ndarray  # [n_layers, n_ff] int32
    n_hot: np.ndarray  # [n_layers] int32
    path: Path | None = None

    # ---- views ----------------------------------------------------------------------------------
    @property
    def policy(self) -> str:
        return self.manifest["policy"]["name"]

    @property
    def status(self) -> str:
        return self.manifest["solver"]["status"]

    @property
    def cold_mode(self) -> str:
        return self.manifest["cold_mode"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest["layers"]

    @property
    def totals(self) -> dict[str, Any]:
        return self.manifest["totals"]

    @property
    def taus(self) -> list[float | None]:
        return [layer["tau"] for layer in self.layers]

    def hot_indices(self, layer: int) -> np.ndarray:
        """Neuron indices of layer `layer` that live on the GPU, hottest first."""
        return self.order[layer, : int(self.n_hot[layer])]

    def cold_indices(self, layer: int) -> np.ndarray:
        """Neuron indices of layer `layer` that live on the CPU, hottest first."""
        return self.order[layer, int(self.n_hot[layer]):]

    def hot_mask(self) -> np.ndarray:
        """[n_layers, n_ff] bool, True where the neuron is hot."""
        mask = np.zeros(self.order.shape, dtype=bool)
        rank = np.arange(self.order.shape[1])[None, :] < self.n_hot[:, None]
        np.put_along_axis(mask, self.order.astype(np.int64), rank, axis=1)
        return mask

    def summary(self) -> dict[str, Any]:
        """The small JSON object `hotcold solve --json` prints and exporters copy into their manifest."""
        s, t = self.manifest["solver"], self.totals
        return {"policy": self.policy, "status": s["status"], "objective": s["objective"], "gap": s["gap"],
                "solve_seconds": s["seconds"], "gpu_bytes": t["gpu_bytes"], "cpu_bytes": t["cpu_bytes"],
                "gpu_budget": self.manifest["budgets"]["gpu_bytes"], "cpu_budget": self.manifest["budgets"]["cpu_bytes"],
                "modelled_ms_per_token": t["modelled_ms_per_token"], "hot_fraction": t["hot_fraction"],
                "gpu_share": t["gpu_share"], "cold_mode": self.cold_mode, "dtype": self.dtype,
                "content_hash": self.content_hash, "path": str(self.path) if self.path else None}

    # ---- I/O ------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Placement:
        """Write the directory `out` (atomically); returns the placement as saved (with file records)."""
        from safetensors.numpy import save_file

        out = Path(out)
        with atomic_dir(out) as tmp:
            save_file({"order": np.ascontiguousarray(self.order, dtype=np.int32),
                       "n_hot": np.ascontiguousarray(self.n_hot, dtype=np.int32)}, str(tmp / TENSORS))
            L, n = self.order.shape
            files = [file_record(tmp, TENSORS, tensors={"order": {"dtype": "int32", "shape": [L, n]},
                                                        "n_hot": {"dtype": "int32", "shape": [L]}})]
            body = {k: v for k, v in self.manifest.items() if k not in ("kind", "format_version", "producer", "files")}
            manifest = write_manifest(tmp, KIND, FORMAT_VERSION, {**body, "files": files})
        return dataclasses.replace(self, manifest=manifest, path=out)

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        from safetensors.numpy import load_file

        path = Path(path)
        manifest = read_manifest(path, KIND, (FORMAT_VERSION,))
        verify_files(path, manifest, KIND)
        t = load_file(str(path / TENSORS))
        order, n_hot = t.get("order"), t.get("n_hot")
        cfg = ModelConfig.from_json(manifest["model"]["config"])
        if order is None or n_hot is None or order.shape != (cfg.n_layers, cfg.n_ff) or n_hot.shape != (cfg.n_layers,):
            raise IncompatibleError(f"placement {path}: {TENSORS} does not hold order [{cfg.n_layers}, {cfg.n_ff}] "
                                    f"and n_hot [{cfg.n_layers}]", "re-create it with `hotcold solve`")
        if (n_hot < 0).any() or (n_hot > cfg.n_ff).any():
            raise IncompatibleError(f"placement {path}: n_hot outside [0, {cfg.n_ff}]", "re-create it with `hotcold solve`")
        return cls(manifest=manifest, order=order, n_hot=n_hot, path=path)
