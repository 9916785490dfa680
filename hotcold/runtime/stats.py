"""Measurements built into the runtime: per-layer GPU-side and CPU-side time, activated neurons served
by each side, and peak memory per device. Prefill (forwards of more than one token) and decode are
kept apart.

Timing: on a CUDA GPU side, GPU work is timed with CUDA events (resolved once per forward, when the
logits are needed on the host anyway); CPU work with perf_counter. When the GPU side runs on the CPU
both are perf_counter intervals of the same thread.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np
import torch

PHASES = ("prefill", "decode")


class PhaseStats:
    def __init__(self, n_layers: int):
        self.forwards = 0
        self.tokens = 0
        self.seconds = 0.0
        self.gpu_s = np.zeros(n_layers)
        self.cpu_s = np.zeros(n_layers)
        self.active_gpu = np.zeros(n_layers, dtype=np.int64)  # activated hot neurons (token x neuron)
        self.active_cpu = np.zeros(n_layers, dtype=np.int64)  # activated cold neurons computed by the CPU
        self.rows_cpu = np.zeros(n_layers, dtype=np.int64)  # cold neurons whose up/down rows were read (per forward:
        # a multi-token forward reads the union of its tokens' active neurons once)
        self.predicted = np.zeros(n_layers, dtype=np.int64)  # cold neurons the predictor chose (predictor mode)

    def to_json(self, n_hot: list[int], n_ff: int) -> dict[str, Any]:
        act_g, act_c = int(self.active_gpu.sum()), int(self.active_cpu.sum())
        tok = max(self.tokens, 1)
        per_layer = []
        for i in range(len(self.gpu_s)):
            tot = int(self.active_gpu[i] + self.active_cpu[i])
            per_layer.append({
                "layer": i, "gpu_ms_per_token": float(1e3 * self.gpu_s[i] / tok),
                "cpu_ms_per_token": float(1e3 * self.cpu_s[i] / tok),
                "gpu_share": (int(self.active_gpu[i]) / tot) if tot else None,
                "active_fraction": tot / (tok * n_ff),
                "cold_rows_read_per_forward": float(self.rows_cpu[i]) / max(self.forwards, 1),
                "predicted_per_forward": float(self.predicted[i]) / max(self.forwards, 1),
                "n_hot": n_hot[i]})
        return {
            "forwards": self.forwards, "tokens": self.tokens, "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "gpu_ms_per_token": 1e3 * float(self.gpu_s.sum()) / tok,
            "cpu_ms_per_token": 1e3 * float(self.cpu_s.sum()) / tok,
            "gpu_share": act_g / (act_g + act_c) if act_g + act_c else None,
            "active_fraction": (act_g + act_c) / (tok * n_ff * len(self.gpu_s)),
            "layers": per_layer,
        }


class Measurements:
    """Accumulates what the runtime does; `summary()` is the JSON `hotcold run --json` prints."""

    def __init__(self, n_layers: int, gpu_device: torch.device, enabled: bool = True):
        self.n_layers = n_layers
        self.gpu_device = gpu_device
        self.cuda = gpu_device.type == "cuda"
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        self.phase = {p: PhaseStats(self.n_layers) for p in PHASES}
        self._events: list[tuple[int, Any, Any]] = []
        self._gpu_active: list[Any] = []
        self._cur: PhaseStats | None = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.gpu_device)

    # ---- one forward ------------------------------------------------------------------------------
    def begin(self, tokens: int, phase: str) -> float:
        self._cur = self.phase[phase]
        self._cur.forwards += 1
        self._cur.tokens += tokens
        return time.perf_counter()

    def end(self, t0: float) -> None:
        cur = self._cur
        if self.cuda:
            torch.cuda.synchronize(self.gpu_device)
            for layer, a, b in self._events:
                cur.gpu_s[layer] += a.elapsed_time(b) / 1e3
            self._events.clear()
            for layer, t in self._gpu_active:
                cur.active_gpu[layer] += int(t)
            self._gpu_active.clear()
        cur.seconds += time.perf_counter() - t0

    def gpu_mark(self):
        """A point in time on the GPU side's stream (a CUDA event, or perf_counter on the CPU)."""
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def gpu_interval(self, layer: int, start, end) -> None:
        if self.cuda:
            self._events.append((layer, start, end))
        else:
            self._cur.gpu_s[layer] += end - start

    def cpu_interval(self, layer: int, seconds: float) -> None:
        self._cur.cpu_s[layer] += seconds

    def gpu_active(self, layer: int, count: torch.Tensor) -> None:
        if self.cuda:
            self._gpu_active.append((layer, count))
        else:
            self._cur.active_gpu[layer] += int(count)

    def cpu_active(self, layer: int, active: int, rows: int, predicted: int = 0) -> None:
        cur = self._cur
        cur.active_cpu[layer] += active
        cur.rows_cpu[layer] += rows
        cur.predicted[layer] += predicted

    # ---- report -----------------------------------------------------------------------------------
    def memory(self, gpu_weight_bytes: int, cpu_weight_bytes: int, shared: bool) -> dict[str, Any]:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss *= 1 if sys.platform == "darwin" else 1024
        gpu: dict[str, Any] = {"device": str(self.gpu_device), "weight_bytes": gpu_weight_bytes}
        if self.cuda:
            gpu["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.gpu_device))
            gpu["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.gpu_device))
        return {"gpu": gpu, "cpu": {"device": "cpu", "weight_bytes": cpu_weight_bytes, "peak_rss_bytes": int(rss)},
                "shared_memory": shared}

    def summary(self, n_hot: list[int], n_ff: int) -> dict[str, Any]:
        return {p: self.phase[p].to_json(n_hot, n_ff) for p in PHASES}
