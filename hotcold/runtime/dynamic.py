"""Dynamic placement: neurons migrate between GPU slots and the CPU while the engine generates.

Every token the engine counts, per slot, whether the neuron was active (hot slots on the GPU inside the
graphs, cold slots from the CPU kernel's flags). Every `every` tokens this hook
  1. folds the counts into an exponential moving average of each neuron's activation frequency
     (per block of `every` tokens, weight `alpha`), starting from the profile's frequencies;
  2. re-decides per layer, greedily and with the solver's cost model (hotcold.solver.costmodel), which
     cold neurons deserve a GPU slot held by a colder hot neuron: pairs (hottest cold, coldest hot) are
     taken while the incoming neuron is more frequent by more than the estimates' noise and a relative
     hysteresis, and the modelled saving over the next `horizon` tokens (default 4 blocks),
     max(T_gpu, T_cpu) before minus after, pays for the migration: the copies (bytes / PCIe) and the
     host's own time per moved neuron (gathering and scattering its rows on the CPU, by bytes);
     the noise margin: an EMA of per-block frequencies from `every` tokens has a standard error of about
     sqrt(p(1 - p) · alpha / ((2 - alpha) · every)); the decision uses the incoming neuron's frequency
     minus `margin` standard errors and the outgoing one's plus `margin` standard errors, so on a
     workload that matches the profile the extremes of sampling noise (the hottest-looking cold
     neuron, the coldest-looking hot one) do not trigger migrations that cannot pay;
     at most `max_swaps` neurons a layer, so the GPU memory never changes (the budget holds);
  3. starts the copies on a side CUDA stream — the incoming rows from the CPU (gathered into pinned
     staging) to GPU staging, the outgoing rows from the GPU slots to pinned staging — while the
     engine keeps generating;
  4. commits at the first token boundary after the copies are done: the GPU slots are overwritten
     (in place, so the captured graphs stay valid), the CPU slots too, and the slot -> neuron maps and
     counts are swapped. Each token therefore runs with one consistent placement: in `exact` mode the
     output is the dense model's whatever moves (tests check this).

A quantized model (hotcold.quant rows on both sides) skips steps 3-4: its moves are
hotcold.runtime.migrate.swap_neurons' byte copies, made synchronously when the decision is taken (the
generation pauses for them; `commit_s` counts that time), since its two sides lay a neuron's bytes out
differently and a move rearranges them.

τ_l(t), the EMA frequency of the coldest hot neuron of each layer, and the migration traffic (neurons,
bytes, copy and commit time) are recorded in `history`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hotcold.runtime.model import HybridModel
from hotcold.runtime.coldkernel import gather_rows, scatter_rows
from hotcold.solver.costmodel import CostModel
from hotcold.workloads.frequencies import smallest


@dataclass
class _Pending:
    plan: list[tuple[int, np.ndarray, np.ndarray]]  # (layer, hot slots, cold slots)
    offsets: list[int]
    event: Any
    keep: list[Any]
    started: float
    start_token: int


@dataclass
class MigrationStats:
    decisions: int = 0
    neurons: int = 0
    bytes: int = 0
    start_s: float = 0.0  # host time spent starting copies (CPU gather into staging, launches)
    commit_s: float = 0.0  # host time spent committing (the generation pauses for this)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, tokens: int) -> dict[str, Any]:
        return {"decisions": self.decisions, "neurons_moved": self.neurons, "bytes_moved": self.bytes,
                "bytes_per_token": self.bytes / max(tokens, 1), "start_ms_total": self.start_s * 1e3,
                "commit_ms_total": self.commit_s * 1e3,
                "stall_ms_per_token": (self.start_s + self.commit_s) * 1e3 / max(tokens, 1)}


class DynamicPlacement:
    def __init__(self, engine: HybridModel, cost: CostModel, prior: np.ndarray, *, every: int = 16,
                 alpha: float = 0.3, hysteresis: float = 0.1, max_swaps: int = 256, horizon: int | None = None,
                 margin: float = 2.0):
        """prior [L, n_ff]: the profile's frequencies (id order), the EMA's starting point; margin: how many
        standard errors of the EMA estimate a swap must clear (0: decide on the point estimates)."""
        self.eng = engine
        self.cm = cost
        self.every = every
        self.alpha = alpha
        self.hyst = hysteresis
        self.max_swaps = max_swaps
        self.horizon = horizon or 4 * every
        self.margin = margin
        self.noise_var = alpha / ((2.0 - alpha) * every)  # EMA variance per unit p(1 - p)
        self.ema = np.array(prior, dtype=np.float64, copy=True)
        self.stats = MigrationStats()
        self.pending: _Pending | None = None
        self.tokens_seen = 0
        self.enabled = True
        D = engine.cfg.dim
        nb = cost.neuron
        self.neuron_bytes = nb.total
        M = max_swaps * engine.L
        pin = engine.cuda
        if any(c.gate is None for c in engine.cl):
            from hotcold.errors import InputError

            raise InputError("dynamic placement moves rows of the bundled CPU layout; this model's cold rows are "
                             "in the split layout", "re-export with --cpu-layout bundled")
        # a quantized model's two sides order a neuron's bytes differently (hotcold.runtime.migrate): its moves
        # are swap_neurons' synchronous byte copies, made when a decision is taken (no staging, no copy stream)
        self.quantized = bool(getattr(engine, "quantized", False))
        self.copy_stream = None
        engine.stats_on = True
        engine.hooks.append(self)
        if self.quantized:
            return
        dt = engine.cl[0].gate.dtype
        self._in_gate = torch.empty(M, D, dtype=dt, pin_memory=pin)
        self._in_ud = torch.empty(M, 2 * D, dtype=dt, pin_memory=pin)
        self._out_gate = torch.empty(M, D, dtype=dt, pin_memory=pin)
        self._out_ud = torch.empty(M, 2 * D, dtype=dt, pin_memory=pin)
        self.copy_stream = torch.cuda.Stream(engine.device) if engine.cuda else None

    # ---- the hook ----------------------------------------------------------------------------
    def __call__(self, eng: HybridModel) -> None:
        self.tokens_seen += 1  # decode steps this hook has seen (engine.reset() does not clear it)
        if self.pending is not None and (not eng.cuda or self.pending.event.query()):
            self._commit()
        if not self.enabled or eng.count_tokens < self.every or self.pending is not None:
            return
        self._fold()
        plan = self.decide()
        self.stats.decisions += 1
        if plan:
            self._start(plan)

    def _fold(self) -> None:
        eng = self.eng
        n = max(eng.count_tokens, 1)
        hot = eng.hot_counts()
        for l in range(eng.L):
            blk = np.zeros(eng.cfg.n_ff)
            blk[eng.gl[l].hot_ids] = hot[l] / n
            blk[eng.cl[l].cold_ids] = eng.cold_count[l] / n
            self.ema[l] = (1 - self.alpha) * self.ema[l] + self.alpha * blk
            eng.hot_count[l].zero_()
            eng.cold_count[l][:] = 0
        eng.count_tokens = 0

    def observe(self, freq: np.ndarray) -> None:
        """Fold one block's activation frequencies [L, n_ff] (id order) counted elsewhere (a replayed trace of
        a real model's firing) into the EMA, as _fold does with the engine's own counts."""
        f = np.asarray(freq, dtype=np.float64)
        if f.shape != self.ema.shape:
            raise ValueError(f"expected frequencies of shape {self.ema.shape}, got {f.shape}")
        self.ema = (1 - self.alpha) * self.ema + self.alpha * f

    def migrate(self, plan: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Carry out a decision now: start the copies and, for a float16 model, wait for them and commit."""
        self.stats.decisions += 1
        if plan:
            self._start(plan)
            self.flush()

    # ---- the decision ------------------------------------------------------------------------
    def taus(self) -> list[float | None]:
        return [float(self.ema[l][g.hot_ids].min()) if g.n_hot else None for l, g in enumerate(self.eng.gl)]

    def decide(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        eng, cm = self.eng, self.cm
        pcie = cm.hw.link.pcie_bandwidth
        plan = []
        for l in range(eng.L):
            g, c = eng.gl[l], eng.cl[l]
            if g.n_hot == 0 or c.n_cold == 0:
                continue
            ph, pc = self.ema[l][g.hot_ids], self.ema[l][c.cold_ids]
            m = min(self.max_swaps, g.n_hot, c.n_cold)
            hs = smallest(ph, m)  # coldest hot slots
            cs = smallest(-pc, m)  # hottest cold slots
            p_in = np.clip(pc[cs] - self.margin * self._se(pc[cs]), 0.0, 1.0)  # pessimistic for the swap
            p_out = np.clip(ph[hs] + self.margin * self._se(ph[hs]), 0.0, 1.0)
            ok = p_in > p_out * (1 + self.hyst) + 1e-12
            n_ok = int(np.argmin(ok)) if not ok.all() else m
            if n_ok == 0:
                continue
            hs, cs, p_in, p_out = hs[:n_ok], cs[:n_ok], p_in[:n_ok], p_out[:n_ok]
            gpu_t = float(cm.gpu_neuron_s(ph).sum())
            cpu_t = float(cm.cpu_neuron_s(pc).sum())
            gain = np.cumsum(cm.cpu_neuron_s(p_in) - cm.cpu_neuron_s(p_out))
            gpu_after = gpu_t + np.cumsum(cm.gpu_neuron_s(p_in) - cm.gpu_neuron_s(p_out))
            before = max(gpu_t, cpu_t)
            after = np.maximum(gpu_after, cpu_t - gain)
            copy_s = np.arange(1, n_ok + 1) * (2 * self.neuron_bytes / pcie + self.host_s_per_neuron())
            value = self.horizon * (before - after) - copy_s
            best = int(np.argmax(value))
            if value[best] <= 0:
                continue
            plan.append((l, hs[: best + 1].astype(np.int64), cs[: best + 1].astype(np.int64)))
        self.stats.history.append({"token": self.tokens_total, "tau": self.taus(),
                                   "swaps": {int(l): int(len(h)) for l, h, _ in plan},
                                   "host_us_per_neuron": self.host_s_per_neuron() * 1e6})
        return plan

    def _se(self, p: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip(p * (1.0 - p), 1e-6, None) * self.noise_var)

    def host_s_per_neuron(self) -> float:
        """The host's marginal time per moved neuron: its rows gathered and scattered on the CPU (read and
        written) at the cost model's CPU bandwidth. Not the measured average (start + commit) / neurons: most
        of that is a fixed cost per migration (launches, one sync), and charging it per neuron makes small
        migrations look unpayable (the measurements: docs/gpu.md)."""
        return 4 * self.neuron_bytes / self.cm.hw.cpu.bandwidth

    @property
    def tokens_total(self) -> int:
        return self.eng.totals.tokens

    # ---- the copies --------------------------------------------------------------------------
    def _start(self, plan: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        eng = self.eng
        t0 = time.perf_counter()
        if self.quantized:
            from hotcold.runtime.migrate import swap_neurons

            for l, hs, cs in plan:
                self.stats.bytes += swap_neurons(eng, l, hs, cs)
                self.stats.neurons += len(hs)
            self.stats.commit_s += time.perf_counter() - t0
            self.stats.history.append({"token": self.tokens_total, "committed": sum(len(h) for _, h, _ in plan),
                                       "tau": self.taus()})
            return
        backend = eng.kernel.backend
        offsets, off, keep = [], 0, []
        for l, hs, cs in plan:
            m = len(hs)
            c = eng.cl[l]
            gather_rows(c.gate, cs, self._in_gate[off:off + m], backend)
            gather_rows(c.up_down, cs, self._in_ud[off:off + m], backend)
            offsets.append(off)
            off += m
        event = None
        if eng.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(eng.device))
            with torch.cuda.stream(self.copy_stream):
                dev_in_g = self._in_gate[:off].to(eng.device, non_blocking=True)
                dev_in_ud = self._in_ud[:off].to(eng.device, non_blocking=True)
                for (l, hs, cs), o in zip(plan, offsets):
                    g, m = eng.gl[l], len(hs)
                    s_t = torch.as_tensor(hs).to(eng.device, non_blocking=True)
                    og = g.hot_gu.index_select(0, s_t)
                    od = g.hot_down.index_select(0, s_t)
                    self._out_gate[o:o + m].copy_(og[:, 0], non_blocking=True)
                    self._out_ud[o:o + m].copy_(torch.cat([og[:, 1], od], dim=1), non_blocking=True)
                    keep += [s_t, og, od]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            keep += [dev_in_g, dev_in_ud]
        else:
            dev_in_g, dev_in_ud = self._in_gate[:off], self._in_ud[:off]
            for (l, hs, cs), o in zip(plan, offsets):
                g, m = eng.gl[l], len(hs)
                s_t = torch.as_tensor(hs)
                self._out_gate[o:o + m].copy_(g.hot_gu[s_t, 0])
                self._out_ud[o:o + m].copy_(torch.cat([g.hot_gu[s_t, 1], g.hot_down[s_t]], dim=1))
            keep += [dev_in_g, dev_in_ud]
        self.pending = _Pending(plan=plan, offsets=offsets, event=event, keep=keep, started=t0,
                                start_token=self.tokens_total)
        self.stats.start_s += time.perf_counter() - t0

    def _commit(self) -> None:
        eng, p = self.eng, self.pending
        t0 = time.perf_counter()
        D = eng.cfg.dim
        dev_in_g, dev_in_ud = p.keep[-2], p.keep[-1]
        if eng.cuda:
            torch.cuda.current_stream(eng.device).wait_event(p.event)
            p.event.synchronize()
        backend = eng.kernel.backend
        for (l, hs, cs), o in zip(p.plan, p.offsets):
            g, c, m = eng.gl[l], eng.cl[l], len(hs)
            s_t = torch.as_tensor(hs).to(eng.device)
            g.hot_gu.index_copy_(0, s_t, torch.stack([dev_in_g[o:o + m], dev_in_ud[o:o + m, :D]], dim=1))
            g.hot_down.index_copy_(0, s_t, dev_in_ud[o:o + m, D:].contiguous())
            scatter_rows(c.gate, cs, self._out_gate[o:o + m], backend)
            scatter_rows(c.up_down, cs, self._out_ud[o:o + m], backend)
            a, b = g.hot_ids[hs].copy(), c.cold_ids[cs].copy()
            g.hot_ids[hs], c.cold_ids[cs] = b, a
            eng.hot_ids_dev[l].index_copy_(0, s_t, torch.as_tensor(b).to(eng.device))
            eng.cold_ids_dev[l].index_copy_(0, torch.as_tensor(cs).to(eng.device), torch.as_tensor(a).to(eng.device))
            # counts gathered since the decision follow their neurons
            hc = eng.hot_count[l].index_select(0, s_t).cpu().numpy()
            eng.hot_count[l].index_copy_(0, s_t, torch.as_tensor(eng.cold_count[l][cs]).to(eng.device))
            eng.cold_count[l][cs] = hc
            self.stats.neurons += m
            self.stats.bytes += 2 * m * self.neuron_bytes
        if eng.cuda:
            torch.cuda.current_stream(eng.device).synchronize()
        self.pending = None
        self.stats.commit_s += time.perf_counter() - t0
        self.stats.history.append({"token": self.tokens_total, "committed": sum(len(h) for _, h, _ in p.plan),
                                   "tau": self.taus()})

    def flush(self) -> None:
        """Commit a migration still in flight (end of a run)."""
        if self.pending is not None:
            if self.eng.cuda:
                self.pending.event.synchronize()
            self._commit()
