"""`hotcold study --scale SHAPE`: every placement policy at a large shape (LLaMA-2-70B), at equal GPU memory,
measured on the runtime with every layer built, on real models' firing statistics.

Weights are random quantized bytes (hotcold.runtime.build.random_quantized_model): nothing here is a
trained 70B model. What is real is the firing: per-neuron frequencies of a real model's profiles (MBPP
train for the placement, MBPP test, HumanEval and prose for the runs), mapped by relative depth onto the
target's layers (hotcold.workloads.frequencies.map_by_depth), and traces of how that model fired on the
first sequences of each eval, block by block (traces.npz: its per-16-token counts, mapped the same way).

Scenarios:
  swiglu  the real model's statistics (a quality-validated sparsity of its profile); every policy decodes
          over the traces (each block sets what fires); the cold side in predictor mode selecting what the
          real predictors measured (selected / active, from the stats)
  relu    the skewed synthetic power law (what PowerInfer's ReLU models show), rescaled so that cold
          neurons fire --relu-density of the time under the fixed hot set; stationary, so the policies
          that react to per-prompt variation have nothing to react to and are not run

Policies, all holding at most the same number of GPU neurons (the budget's):
  fixed     PowerInfer's global τ: the most frequent neurons of the profile over all layers
  impact    PowerInfer's ILP (hotcold.solver, policy impact) on the mapped profile
  adaptive  hotcold's latency MILP (policy adaptive) under this machine's measured rates
  random    fixed's per-layer counts, neurons drawn at random: what the hot/cold split is worth at all
  dynamic   fixed's placement plus the runtime's EMA migration (hotcold.runtime.dynamic.DynamicPlacement)
            fed each trace block's real counts, deciding and moving neurons (swap_neurons) in the loop
  prompt    the hot set re-chosen from each prompt's prefill counts before its continuation (rehome)
  oracle    each continuation's own top set: the ceiling of any per-prompt choice (moves not charged)
The time dynamic and prompt spend deciding and moving is measured in the loop and charged per real token
of the trace; rounds are interleaved across the policies of one build. `hotcold profile hotsets`' replay
on the real model itself (hotsets.json) is reported beside, for the ceiling over all its sequences.

Each (scenario, budget) runs in its own process; nvidia-smi is sampled while it runs, so the GPU memory
reported is what the process held (CUDA context, weights, KV cache, predictors, buffers).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hotcold.errors import InputError

GiB = 1 << 30
POLICIES = ("fixed", "impact", "adaptive", "random", "dynamic", "prompt", "oracle")
SOLVED = ("impact", "adaptive")
REPLAYED = {"dynamic": "fixed", "prompt": "profile", "oracle": "profile"}  # policy -> hotsets reference
SCENARIOS = ("swiglu", "relu")
Log = Callable[[str], None]


SAMPLER_BANK_ROWS = 32  # uniform draws per neuron the sampled predictor cycles through (float16 each)


def _log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


@dataclass
class ScaleConfig:
    shape: str = "llama2-70b"
    layers: int | None = None  # default: the shape's
    stats: Path = Path("bench/.cache/q70b")  # workloads.npz (+ workloads.json) and hotsets.json
    quant: str = "q4"
    budgets: list[str] = field(default_factory=lambda: ["24GiB", "48GiB"])
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    ctx_len: int = 512
    tokens: int = 16
    warm: int = 4
    rounds: int = 3
    predictor_rank: int = 128
    relu_density: float = 0.10
    trace_tokens: int = 1  # timed decode steps per block of a trace
    cells: list[str] = field(default_factory=list)  # SCENARIO@BUDGET to run (empty: every combination)
    # kept out of the hot set under a byte budget: what torch's pool does not show (Triton, cuBLAS: 0.13 GiB
    # at 70B shape) and the allocator's rounding, with room to spare (docs/gpu.md has the measurements)
    slack: str = "1.3GiB"
    cpu_threads: int | None = None
    device: str = "cuda"
    seed: int = 0
    time_limit: float = 20.0  # solver
    out: Path = Path("hotcold-study-scale")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"], d["out"] = str(self.stats), str(self.out)
        return d

    def validate(self) -> None:
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise InputError(f"unknown policy {bad[0]!r}", f"use some of: {', '.join(POLICIES)}")
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise InputError(f"unknown scenario {bad[0]!r}", f"use some of: {', '.join(SCENARIOS)}")
        if "swiglu" in self.scenarios:
            for f in ("workloads.npz", "hotsets.json"):
                if not (Path(self.stats) / f).exists():
                    raise InputError(f"{Path(self.stats) / f} does not exist (the swiglu scenario's statistics)",
                                     "make them with `hotcold study --scale SHAPE --prepare DIR --profile-dir P --eval-profile NAME=E`")
        every = {f"{s_}@{b}" for s_ in self.scenarios for b in self.budgets}
        bad = [k for k in self.cells if k not in every]
        if bad:
            raise InputError(f"cell {bad[0]!r} is not one of --scenarios x --budgets ({', '.join(sorted(every))})",
                             "name cells as SCENARIO@BUDGET, e.g. --cells relu@24GiB,swiglu@48GiB")
        if self.rounds < 1 or self.tokens < 1:
            raise InputError("--rounds and --tokens must be at least 1", "pass e.g. --rounds 3 --tokens 16")


# ---- the statistics: made on the machine that has the real profiles ------------------------------
def prepare(out: Path, profile: Path, evals: dict[str, Path], shape: str, layers: int | None = None,
            hotsets: dict[str, Path] | None = None, shares: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6),
            predictors: Path | None = None, seed: int = 0, trace_sequences: int = 8, trace_blocks: int = 16,
            log: Log = _log) -> Path:
    """workloads.npz (train and each eval's frequencies mapped onto the shape), hotsets.json (each eval's
    hot-set replay on the real model: `hotcold profile hotsets`, computed here unless given), traces.npz
    (the first sequences of each eval, at most `trace_sequences` and as many whole ones as fit in
    `trace_blocks` blocks, as the real model fired them: prefill counts and
    the continuation's counts per block, in the source's own shape; the device maps them as workloads.npz
    was mapped) and workloads.json (where they came from) into `out`, written to a temporary folder and
    renamed."""
    import shutil
    import tempfile

    from hotcold.model.config import shape as get_shape
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.hotsets import HotsetOptions, measure_hotsets
    from hotcold.workloads import frequencies as wl

    cfg = get_shape(shape)
    L = int(layers or cfg.n_layers)
    names = ["train", *evals]
    srcs, infos = [], {}
    for name, path in zip(names, [profile, *evals.values()]):
        f, info = wl.load_frequencies(path)
        srcs.append(f)
        infos[name] = info
        log(f"{name}: {path}: {f.shape[0]} layers x {f.shape[1]} neurons, mean frequency {f.mean():.3f}")
    mapped = wl.map_by_depth(srcs, L, cfg.n_ff, seed=seed)
    hs: dict[str, Any] = {}
    train = Profile.load(profile)
    for name, path in evals.items():
        if hotsets and name in hotsets:
            d = json.loads(Path(hotsets[name]).read_text())
            hs[name] = d.get("hotsets", d)
        else:
            log(f"{name}: hot-set replay on the real model (hotcold profile hotsets)")
            hs[name] = measure_hotsets(train, Profile.load(path, with_sequences=True), HotsetOptions(shares=shares), log=log)
        if "prompt_moved_per_sequence" not in hs[name]:
            raise InputError(f"the hot-set result for {name} has no prompt_moved_per_sequence",
                             "re-run `hotcold profile hotsets` with this version of hotcold")
    traces: dict[str, np.ndarray] = {}
    trace_info: dict[str, Any] = {}
    for name, path in evals.items():
        ev = Profile.load(path, with_sequences=True)
        sq = ev.sequences
        if not sq or "blocks" not in sq:
            raise InputError(f"{path} has no per-block sequence records (the traces the policies run on)",
                             "profile it with `hotcold profile run --per-sequence`")
        # whole sequences in order, as many as fit in trace_blocks blocks (at least one, at most trace_sequences)
        per = np.bincount(sq["block_seq"], minlength=int(sq["tokens"].shape[0]))
        n = 1
        while n < min(int(trace_sequences), len(per)) and per[: n + 1].sum() <= trace_blocks:
            n += 1
        keep = np.flatnonzero(sq["block_seq"] < n)
        keep = keep[np.argsort(sq["block_seq"][keep], kind="stable")]
        traces.update({f"{name}/prefill": sq["prefill"][:n], f"{name}/tokens": sq["tokens"][:n],
                       f"{name}/blocks": sq["blocks"][keep], f"{name}/block_seq": sq["block_seq"][keep],
                       f"{name}/block_tokens": sq["block_tokens"][keep]})
        trace_info[name] = {"sequences": n, "blocks": int(len(keep)),
                            "continuation_tokens": int(sq["block_tokens"][keep].sum()),
                            "block": int((ev.manifest.get("sequences") or {}).get("block") or 0)}
    sel = None
    if predictors is not None and Path(predictors).exists():
        pj = json.loads(Path(predictors).read_text())
        summ = pj["summary"]
        ratios = [x["selected_fraction"] / x["active_fraction"] for x in pj.get("layers") or []
                  if x.get("active_fraction")]
        sel = {"selected_over_active": float(np.median(ratios)) if ratios else summ["selected_fraction_median"] / 0.5,
               "source": str(predictors), "model": (pj.get("settings") or {}).get("model"),
               "recall": summ["recall_median"], "precision": summ["precision_median"],
               "selected_fraction": summ["selected_fraction_median"]}
    meta = {"shape": shape, "layers": L, "n_ff": cfg.n_ff, "seed": seed, "profiles": infos,
            "mapping": "source layers by relative depth, neurons by a shared random map with log-normal "
                       "jitter 0.25 (hotcold.workloads.frequencies.map_by_depth)",
            "predictor": sel, "mean_frequency": {k: float(m.mean()) for k, m in zip(names, mapped)},
            "source_shape": [int(srcs[0].shape[0]), int(srcs[0].shape[1])], "n_layers_mapped": L,
            "traces": trace_info}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    np.savez_compressed(tmp / "workloads.npz", **{k: m.astype(np.float16) for k, m in zip(names, mapped)})
    np.savez_compressed(tmp / "traces.npz", **traces)
    (tmp / "hotsets.json").write_text(json.dumps(hs) + "\n")
    (tmp / "workloads.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"wrote {out}/ (workloads.npz {(out / 'workloads.npz').stat().st_size / 1e6:.1f} MB, traces.npz "
        f"{(out / 'traces.npz').stat().st_size / 1e6:.1f} MB, hotsets.json)")
    return out


# ---- the replayed policies' per-layer figures ------------------------------------------------------
def _interp(xs: list[float], ys: np.ndarray, s: float) -> np.ndarray:
    """Linear interpolation of ys [len(xs), ...] at s (clamped to the measured range)."""
    xs_a = np.asarray(xs, dtype=np.float64)
    s = float(np.clip(s, xs_a.min(), xs_a.max()))
    i = int(np.searchsorted(xs_a, s))
    if i == 0 or xs_a[min(i, len(xs_a) - 1)] == s:
        return np.asarray(ys[min(i, len(xs_a) - 1)], dtype=np.float64)
    w = (s - xs_a[i - 1]) / (xs_a[i] - xs_a[i - 1])
    return (1 - w) * np.asarray(ys[i - 1], dtype=np.float64) + w * np.asarray(ys[i], dtype=np.float64)


def replay_factors(hs: dict[str, Any], share: float, n_layers: int, n_ff: int) -> dict[str, Any]:
    """At GPU neuron share `share`: for each replayed policy, the per-layer ratio of its cold activations
    to its reference's (mapped by depth onto n_layers), and the neurons it moves per token (scaled to
    n_layers x n_ff by the fraction of all neurons)."""
    from hotcold.workloads.frequencies import depth_index

    L_src, F_src = int(hs["model"]["n_layers"]), int(hs["model"]["n_ff"])
    idx = depth_index(n_layers, L_src)
    shares = hs["shares"]
    caught = {c: _interp(shares, np.asarray(hs["layers"][c]), share)
              for c in ("fixed", "profile", "dynamic", "prompt", "oracle", "random")}
    tokens = max(int(hs["continuation_tokens"]), 1)
    per_seq_tokens = tokens / max(int(hs["sequences"]), 1)
    dyn_swaps = _interp(shares, np.asarray([d["swaps"] for d in hs["dynamic"]], dtype=np.float64), share)
    moved_frac = {"dynamic": float(dyn_swaps) / tokens / (L_src * F_src),
                  "prompt": float(_interp(shares, np.asarray(hs["prompt_moved_per_sequence"]), share)) / per_seq_tokens,
                  "oracle": 0.0}
    out: dict[str, Any] = {"share": share, "source": {"layers": L_src, "n_ff": F_src, "tokens": tokens,
                                                      "sequences": int(hs["sequences"])}, "policies": {}}
    for pol, ref in REPLAYED.items():
        r = (1 - caught[pol]) / np.maximum(1 - caught[ref], 1e-9)
        out["policies"][pol] = {
            "reference": ref, "cold_ratio": [float(r[i]) for i in idx],
            "caught_overall": float(np.interp(share, shares, hs["overall"][pol])),
            "reference_caught_overall": float(np.interp(share, shares, hs["overall"][ref])),
            "moved_per_token": moved_frac[pol] * n_layers * n_ff,
            "moved_note": {"dynamic": "the replay's swaps per continuation token",
                           "prompt": "neurons entering the GPU per prompt (hotsets prompt_moved_per_sequence) "
                                     "over the mean continuation length",
                           "oracle": "not a runnable policy: its hot set is known only after the continuation"}[pol]}
    out["fixed_caught_overall"] = float(np.interp(share, shares, hs["overall"]["fixed"]))
    out["oracle_over_fixed"] = out["policies"]["oracle"]["caught_overall"] / max(out["fixed_caught_overall"], 1e-12)
    return out


# ---- GPU memory while a process runs ---------------------------------------------------------------
class NvSampler:
    """The most GPU memory nvidia-smi shows while it runs (MiB), sampled every 0.25 s (0 without nvidia-smi)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                o = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=5).stdout.split()
                self.peak = max(self.peak, int(o[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.25)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()


def gpu_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def hot_first(f_place: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """Per layer: a neuron order with the hot neurons first (hottest first), then the cold ones (hottest first)."""
    perm = []
    for l in range(f_place.shape[0]):
        o = np.argsort(-f_place[l], kind="stable")
        perm.append(np.concatenate([o[hot[l][o]], o[~hot[l][o]]]))
    return np.stack(perm)


# ---- the rates a machine's runs are predicted from --------------------------------------------------
def measure_rates(shape: str, quant: str, threads: int | None, log: Log = _log) -> dict[str, Any]:
    """GPU read rate and the quantized GEMV rates; CPU read ceiling and the quantized cold kernel's rates
    on one layer of the shape; the time to move quantized neurons between the sides (swap_neurons)."""
    import torch

    from hotcold.devices import median_time as _t
    from hotcold.model.config import shape as get_shape
    from hotcold.qformat import parse_format
    from hotcold.quant import random_qtensor
    from hotcold.runtime.build import quantized_cpu_layer, random_quantized_model
    from hotcold.runtime.calib import device_numbers, read_ceiling
    from hotcold.runtime.migrate import swap_neurons
    from hotcold.runtime.qkernels import QColdKernel

    cfg = get_shape(shape)
    fmt = parse_format(quant)
    m = device_numbers(log)
    D, rows = cfg.dim, cfg.n_ff // 2
    cuda = torch.cuda.is_available()
    if cuda:
        from hotcold.runtime.qtriton import QGpuOps

        dev = torch.device("cuda")
        ops = QGpuOps(dev)
        w = random_qtensor(2 * cfg.n_ff, D, fmt, device=dev, seed=1)
        x = torch.randn(D, device=dev, dtype=torch.float32)
        y = torch.empty(2 * cfg.n_ff, device=dev, dtype=torch.float32)
        ops.qgemv(w, y, x=x)
        m["gpu_q4_gemv_GBps"] = w.packed.numel() / _t(lambda: ops.qgemv(w, y, x=x), 50, torch.cuda.synchronize) / 1e9
        k_hot = cfg.n_ff // 2
        a = torch.empty(k_hot, device=dev, dtype=torch.float32)
        wg = random_qtensor(2 * k_hot, D, fmt, device=dev, seed=2)
        ops.qgate_up(wg, a, x=x)
        m["gpu_q4_gate_up_GBps"] = wg.packed.numel() / _t(lambda: ops.qgate_up(wg, a, x=x), 50,
                                                          torch.cuda.synchronize) / 1e9
        wd = random_qtensor(k_hot, D, fmt, device=dev, seed=3)
        yd = torch.zeros(D, device=dev, dtype=torch.float32)
        ops.qvecmat_add(a, wd, yd)
        m["gpu_q4_vecmat_GBps"] = wd.packed.numel() / _t(lambda: ops.qvecmat_add(a, wd, yd), 50,
                                                         torch.cuda.synchronize) / 1e9
        m["gpu_tuning_log"] = ops.tuning_log
        log(f"q gemv [{2 * cfg.n_ff}, {D}] {quant}: {m['gpu_q4_gemv_GBps']:.0f} GB/s, gate_up "
            f"{m['gpu_q4_gate_up_GBps']:.0f}, vecmat {m['gpu_q4_vecmat_GBps']:.0f} GB/s")
        del w, x, y, wg, wd, a
    gdev = torch.device("cuda") if cuda else torch.device("cpu")
    qs = [random_qtensor(rows, D, fmt, device=gdev, seed=s) for s in (11, 12, 13)]
    layer = quantized_cpu_layer(qs[0], qs[1], qs[2], np.arange(rows, dtype=np.int64), cuda)
    del qs
    k = QColdKernel(D, "auto", threads)
    k.warm_up(fmt)
    xh = torch.randn(D, dtype=torch.float32)
    yh = torch.empty(D, dtype=torch.float32)
    table = {}
    for dens in (0.1, 0.45, 0.7):
        mask = torch.from_numpy((np.random.default_rng(0).random(rows) < dens).astype(np.uint8))
        tt = _t(lambda: k.run(layer, xh, "predictor", mask=mask, active=mask, out=yh), 7)
        b = k.run(layer, xh, "predictor", mask=mask, active=mask, out=yh).bytes_read
        table[f"predictor_{dens}"] = {"ms": tt * 1e3, "bytes": b, "GBps": b / tt / 1e9}
    tt = _t(lambda: k.run(layer, xh, "exact", out=yh), 5)
    b = k.run(layer, xh, "exact", out=yh).bytes_read
    table["exact"] = {"ms": tt * 1e3, "bytes": b, "GBps": b / tt / 1e9}
    m["cpu_q_kernel"] = table
    m["cpu_read_ceiling"] = read_ceiling([layer.gate.packed, layer.up_down.packed], threads or os.cpu_count(), log)
    log(f"q cold kernel {quant}: " + ", ".join(f"{k_}: {v['GBps']:.1f} GB/s" for k_, v in table.items()))
    del layer
    # moving neurons: one layer of the shape, half of it hot, swapped m at a time both ways (synchronous)
    one = random_quantized_model(cfg.replace(n_layers=1, vocab_size=min(cfg.vocab_size, 4096)), [cfg.n_ff // 2],
                                 fmt, device=gdev, max_len=64, cold_mode="exact", seed=5)
    mig = {}
    rng = np.random.default_rng(0)
    for n in (256, 2048):
        hs = rng.choice(cfg.n_ff // 2, n, replace=False)
        cs = rng.choice(cfg.n_ff - cfg.n_ff // 2, n, replace=False)
        swap_neurons(one, 0, hs, cs)
        t = _t(lambda: swap_neurons(one, 0, hs, cs), 5)
        mig[str(n)] = {"seconds": t, "us_per_neuron": 1e6 * t / n,
                       "bytes": 2 * n * 3 * fmt.row_bytes(D), "GBps": 2 * n * 3 * fmt.row_bytes(D) / t / 1e9}
    m["migrate"] = mig
    log("swap_neurons: " + ", ".join(f"{n}: {v['us_per_neuron']:.1f} us/neuron ({v['GBps']:.1f} GB/s)"
                                     for n, v in mig.items()))
    return m


def machine_spec(m: dict[str, Any], name: str = "measured-q"):
    """A HardwareSpec of the measured rates: the quantized GEMV for the GPU, the quantized cold kernel
    (at density 0.45) for the CPU."""
    import dataclasses

    from hotcold.runtime.calib import measured_spec
    from hotcold.solver.hardware import preset

    spec = measured_spec(m, m["cpu_q_kernel"]["predictor_0.45"]["GBps"], name=name)
    if "gpu_q4_gemv_GBps" in m:
        spec = dataclasses.replace(spec, gpu=dataclasses.replace(spec.gpu, bandwidth=m["gpu_q4_gemv_GBps"] * 1e9))
    return dataclasses.replace(spec, link=dataclasses.replace(spec.link, host_overhead_seconds=preset(
        "h200-decode").link.host_overhead_seconds))


# ---- one (scenario, budget): its own process ----------------------------------------------------------
def _budget_room(budget: str, cfg, acct, ctx0: int, slack: int) -> tuple[int, str]:
    """GPU bytes the model may hold: a cap on what the GPU shows (context included) less the context and
    the slack, or `ffn:F` = the placement-independent bytes + F of the FFN's."""
    from hotcold.memory import parse_bytes

    if budget.startswith("ffn:"):
        try:
            frac = float(budget[4:])
        except ValueError:
            raise InputError(f"budget {budget!r} is not ffn:FRACTION", "pass e.g. ffn:0.3 or 24GiB") from None
        ffn = acct([cfg.n_ff] * cfg.n_layers, "exact").gpu_total - acct([0] * cfg.n_layers, "exact").gpu_total
        return int(acct([0] * cfg.n_layers).gpu_total + frac * ffn), \
            f"placement-independent bytes (predictors included) + {frac:g} of the FFN bytes"
    cap = parse_bytes(budget, "GPU budget")
    return int(cap - ctx0 - slack), (f"{budget} of GPU memory as nvidia-smi shows it, less the CUDA context "
                                     f"({ctx0 / GiB:.2f} GiB measured) and {slack / GiB:.2f} GiB slack")


def _solve(policy: str, f: np.ndarray, cfg, hw, quant: str, room: int, ctx_len: int, rank: int,
           time_limit: float) -> tuple[np.ndarray, dict[str, Any]]:
    from hotcold.solver.solve import solve_frequencies

    pl = solve_frequencies(f, cfg, hw, policy, gpu_budget=room, cold_mode="predictor", ctx_len=ctx_len,
                           dtype=quant, predictor_rank=rank, time_limit=time_limit)
    hot = np.zeros(f.shape, dtype=bool)
    for l in range(cfg.n_layers):
        hot[l, pl.hot_indices(l)] = True
    sv = pl.manifest.get("solver", {})
    return hot, {"status": sv.get("status"), "gap": sv.get("gap"), "seconds": sv.get("seconds"),
                 "modelled_ms_per_token": pl.manifest["totals"]["modelled_ms_per_token"]}


def child(spec: dict[str, Any], log: Log = _log) -> dict[str, Any]:
    import torch

    from hotcold.bench.fits import predict_ms
    from hotcold.bench.runs import run_engine
    from hotcold.memory import placement_bytes
    from hotcold.model.config import shape as get_shape
    from hotcold.runtime.build import random_quantized_model
    from hotcold.runtime.selectors import SampledPredictor
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import HardwareSpec, preset
    from hotcold.workloads import frequencies as wl

    t0 = time.perf_counter()
    scen, budget, quant, ctx_len = spec["scenario"], spec["budget"], spec["quant"], spec["ctx_len"]
    cfg = get_shape(spec["shape"])
    rank = max(1, min(int(spec["rank"]), cfg.dim // 4))  # a low-rank predictor: at most a quarter of the width
    L = int(spec["layers"] or cfg.n_layers)
    cfg = cfg.replace(n_layers=L, max_seq_len=max(ctx_len, 64))
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    if cuda:
        torch.zeros(1, device=dev)
    ctx0 = gpu_used() if cuda else 0
    hw = HardwareSpec.from_json(spec["hw"]) if spec.get("hw") else preset("h200-decode")
    acct = lambda n, mode="predictor": placement_bytes(cfg, [int(v) for v in n], quant, ctx_len=ctx_len,  # noqa: E731
                                                       cold_mode=mode, predictor_rank=rank if mode == "predictor" else None)
    room, room_note = _budget_room(budget, cfg, acct, ctx0, spec["slack"])
    res: dict[str, Any] = {"scenario": scen, "budget": budget, "budget_note": room_note, "room_bytes": room,
                           "cuda_context_bytes": ctx0, "layers": L, "shape": spec["shape"], "quant": quant,
                           "hardware": hw.to_json(), "predictor_rank": rank, "runs": {}, "skipped": {}}
    fixed_b = acct([0] * L).gpu_total
    per = (acct([1] * L).gpu_total - fixed_b) / L
    full_exact = acct([cfg.n_ff] * L, "exact").gpu_total
    if room < full_exact and not budget.startswith("ffn:"):
        # a cap on the GPU's memory: the sampled predictor's stand-in state (its uniform bank, probabilities,
        # outputs) lives on the GPU beside the real predictor's weights that the account prices, so the hot
        # set makes room for it (ffn:F budgets count model bytes only)
        standin = L * cfg.n_ff * (SAMPLER_BANK_ROWS * 2 + 4 + 4 + 1) + L * rank * 4
        room -= standin
        res["room_bytes"], res["sampler_standin_bytes"] = room, standin
        res["budget_note"] = room_note + f", less {standin / GiB:.2f} GiB of the sampled predictor's stand-in state"
    K = int(max(0, (room - fixed_b) // per))
    res["neurons_that_fit"] = K
    stats = Path(spec["stats"])
    sel_ratio = 1.0
    traces: dict[str, list[dict[str, Any]]] = {}
    if scen == "swiglu":
        z = np.load(stats / "workloads.npz")
        f_place = z["train"].astype(np.float64)[:L, :cfg.n_ff]
        evals = {k: z[k].astype(np.float64)[:L, :cfg.n_ff] for k in z.files if k != "train"}
        meta = json.loads((stats / "workloads.json").read_text()) if (stats / "workloads.json").exists() else {}
        sel_ratio = float((meta.get("predictor") or {}).get("selected_over_active") or spec["selected_over_active"])
        hsets = json.loads((stats / "hotsets.json").read_text())
        res["workload"] = {"kind": "real statistics, mapped by depth", "profiles": meta.get("profiles"),
                           "mapping": meta.get("mapping"), "predictor": meta.get("predictor"),
                           "selected_over_active": sel_ratio}
        if (stats / "traces.npz").exists() and meta.get("source_shape"):
            traces = load_traces(stats, meta, L, cfg.n_ff)
            res["workload"]["traces"] = {
                e: {"sequences": len(v), "blocks": sum(len(q["blocks"]) for q in v),
                    "real_tokens": sum(q["tokens"] for q in v), "timed_steps_per_block": int(spec.get("trace_tokens") or 1)}
                for e, v in traces.items()}
            res["workload"]["trace_note"] = (
                "every policy decodes over the first sequences of each eval as the real model fired them, block by "
                "block (its per-block counts mapped onto this shape); dynamic and per-prompt move neurons in the "
                "loop and their time is charged per real token")
    else:
        f0 = wl.synthetic(L, cfg.n_ff, spec["seed"])
        gamma = wl.density_power(f0, ~wl.global_top_k_mask(f0, min(K, L * cfg.n_ff - 1)), spec["relu_density"])
        f_place = np.clip(f0, 0, 1) ** gamma
        evals = {"synthetic": f_place}
        hsets = {}
        res["workload"] = {"kind": "synthetic power law (ReLU-like)", "gamma": gamma,
                           "note": f"rescaled so that cold neurons fire {spec['relu_density']:.2f} of the time "
                                   "under the fixed hot set; stationary: the run draws from the profile's frequencies"}
    all_gpu = room >= full_exact
    res["all_fit"] = bool(all_gpu)
    policies = list(spec["policies"])
    why = None
    if scen == "relu":
        why = "the synthetic workload is stationary (no per-sequence records): nothing to react to"
    elif not traces:
        why = f"{stats} has no traces.npz (the real model's per-block firing): re-run --prepare with this version"
    if why:
        for p in REPLAYED:
            if p in policies:
                policies.remove(p)
                res["skipped"][p] = why
    groups: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    if all_gpu:
        hot = np.ones((L, cfg.n_ff), dtype=bool)
        groups[tuple([cfg.n_ff] * L)] = [("all-gpu", hot)]
        res["note"] = (f"the budget holds the whole model ({full_exact / GiB:.2f} GiB with a {ctx_len}-token KV "
                       "cache): every policy places every neuron on the GPU, so one run stands for all")
    else:
        fixed = wl.global_top_k_mask(f_place, K)
        placements = {"fixed": fixed}
        res["solver"] = {}
        for p in policies:
            if p in SOLVED:
                hot, info = _solve(p, f_place, cfg, hw, quant, room, ctx_len, rank, spec["time_limit"])
                if hot.sum() > K:  # the solver's account and this one disagree: hold no more than fixed
                    info["trimmed_from"] = int(hot.sum())
                    hot = hot & wl.global_top_k_mask(np.where(hot, f_place, -1.0), K)
                placements[p] = hot
                res["solver"][p] = info
                log(f"{scen} {budget}: {p} placed {int(hot.sum())} neurons ({info['status']}, {info['seconds']:.1f} s)")
        rng = np.random.default_rng(spec["seed"] + 7)
        if "random" in policies:
            rnd = np.zeros_like(fixed)
            for l, k in enumerate(fixed.sum(1)):
                rnd[l, rng.choice(cfg.n_ff, int(k), replace=False)] = True
            placements["random"] = rnd
        for p in policies:
            hot = placements.get(p, fixed)
            groups.setdefault(tuple(int(v) for v in hot.sum(1)), []).append((p, hot))
    share = K / (L * cfg.n_ff)
    factors = {e: replay_factors(hsets[e], min(share, 1.0), L, cfg.n_ff) for e in evals if e in hsets} \
        if not all_gpu else {}
    res["replay"] = factors
    mig_s_per_neuron = spec.get("migrate_s_per_neuron")
    peak_reserved = 0
    res["gpu_memory"] = []  # per build: where the GPU memory went, stage by stage (torch's counters, bytes)

    def mem(stages: dict[str, Any], name: str) -> None:
        if cuda:
            torch.cuda.synchronize(dev)
            stages[name] = {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
                            "max_allocated": torch.cuda.max_memory_allocated(dev),
                            "max_reserved": torch.cuda.max_memory_reserved(dev), "device_used": gpu_used()}
    for n_hot, members in groups.items():
        mode = "exact" if all_gpu else "predictor"
        probs0 = np.full((L, cfg.n_ff), 0.5)
        selector = (SampledPredictor(probs0, cfg.dim, rank, dev, torch.float16, bank_rows=SAMPLER_BANK_ROWS, seed=spec["seed"] + 1)
                    if mode == "predictor" else None)
        stages: dict[str, Any] = {"n_hot_total": int(sum(n_hot))}
        res["gpu_memory"].append(stages)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        mem(stages, "selector")
        tb = time.perf_counter()
        eng = random_quantized_model(cfg, list(n_hot), quant, device=dev, seed=spec["seed"], max_len=ctx_len,
                                     cold_mode=mode, selector=selector, rule="gate", cpu_threads=spec.get("cpu_threads"))
        mem(stages, "built")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        mem(stages, "built_emptied")
        t_build = time.perf_counter() - tb
        log(f"{scen} {budget}: built {L} layers with {sum(n_hot)} hot neurons in {t_build:.0f} s "
            f"({', '.join(p for p, _ in members)})")
        if eng.cl[0].n_cold or any(c.n_cold for c in eng.cl):
            eng.kernel.warm_up(eng.cl[0].gate.fmt)
        if not all_gpu and mig_s_per_neuron is None:
            mig_s_per_neuron = _time_migration(eng, log)
            mem(stages, "migration_timed")
        account = acct(n_hot, mode)
        cm = CostModel(cfg, hw, quant, cold_mode=mode, ctx_len=ctx_len,
                       **({"predictor_rank": rank} if mode == "predictor" else {}))

        def common(p: str, r: dict[str, Any]) -> dict[str, Any]:
            r.update({"policy": p, "n_hot_total": int(sum(n_hot)), "n_hot_per_layer": list(n_hot),
                      "gpu_neuron_share": float(sum(n_hot) / (L * cfg.n_ff)), "account_gpu_bytes": account.gpu_total,
                      "account": account.to_json(), "build_s": t_build})
            if r.get("predicted_ms_per_token"):
                r["model_error"] = r["predicted_ms_per_token"] / r["ms_per_token"] - 1
            return r

        if traces and not all_gpu:
            def done(key: str, r: dict[str, Any]) -> None:
                p, e = key.split("@")
                res["runs"][key] = {**common(p, r), "eval": e}
                log(f"{scen} {budget} {key}: {r['ms_per_token']:.1f} ms/token (rounds "
                    f"{', '.join(f'{v:.1f}' for v in r['rounds_ms_per_token'])}) + {r['migration']['stall_ms_per_token']:.2f} "
                    f"stall, GPU share of activations {r['gpu_share_of_activations']:.3f}")
                _save_partial(res, spec)

            _run_traces(eng, selector, members, traces, f_place, n_hot, sel_ratio, cm, spec, log, done)
            members = []
        for p, hot in members:
            perm = hot_first(f_place, hot)
            hm = np.zeros_like(hot)
            for l in range(L):
                hm[l, : int(n_hot[l])] = True
            for e, f_run in evals.items():
                work = np.take_along_axis(f_run, perm, axis=1)  # what fires, in the model's neuron order
                sel = np.where(hm, work, np.clip(work * sel_ratio, 0, 1))  # what the predictor selects
                r = _run_policy(eng, selector, sel, spec) if not all_gpu else _run_policy(eng, None, None, spec)
                n_cold = sum(c.n_cold for c in eng.cl)
                r.update({"mode": "stationary", "eval": e,
                          "gpu_share_of_activations": float((work * hm).sum() / max(work.sum(), 1e-12)),
                          "expected_cold_active_per_token": float((work * ~hm).sum()),
                          "expected_cold_selected_per_token": float((sel * ~hm).sum()),
                          "measured_cold_selected_fraction": r["cold_active_per_token"] / max(n_cold, 1)})
                pred = predict_ms(cm, sel if mode == "predictor" else np.ones_like(sel), hm)
                r["predicted_ms_per_token"] = pred["ms_per_token"]
                common(p, r)
                r["migration"] = {"neurons_per_token": 0.0, "bytes_per_token": 0.0, "stall_ms_per_token": 0.0,
                                  "note": "no migration"}
                r["ms_per_token_with_migration"] = r["ms_per_token"]
                key = f"{p}@{e}" if not all_gpu else "all-gpu"
                res["runs"][key] = r
                log(f"{scen} {budget} {key}: {r['ms_per_token']:.1f} ms/token (rounds "
                    f"{', '.join(f'{v:.1f}' for v in r['rounds_ms_per_token'])}), GPU share of activations "
                    f"{r['gpu_share_of_activations']:.3f}, migration {r['migration']['stall_ms_per_token']:.2f} ms/token")
                mem(stages, f"ran {key}")
                _save_partial(res, spec)
                if all_gpu:
                    break
        if cuda:
            peak_reserved = max(peak_reserved, torch.cuda.max_memory_reserved(dev))
        del eng, selector
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    res["migrate_s_per_neuron"] = mig_s_per_neuron
    res["torch_max_reserved_bytes"] = peak_reserved
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["seconds"] = time.perf_counter() - t0
    return res


def _save_partial(res: dict[str, Any], spec: dict[str, Any]) -> None:
    """The cell so far, beside its result file: what a run cut short by a deadline leaves."""
    from hotcold.bench.harness import save_json

    save_json(res, Path(spec["result"] + ".partial"))


def _time_migration(eng: Any, log: Log) -> float | None:
    """Seconds per neuron moved (both directions) on this model's first layer with both sides, swapped
    there and back (the weights end where they started)."""
    from hotcold.devices import median_time
    from hotcold.runtime.migrate import swap_neurons

    for l, (g, c) in enumerate(zip(eng.gl, eng.cl)):
        m = min(g.n_hot, c.n_cold, 2048)
        if m >= 16:
            rng = np.random.default_rng(0)
            hs, cs = rng.choice(g.n_hot, m, replace=False), rng.choice(c.n_cold, m, replace=False)
            t = median_time(lambda: swap_neurons(eng, l, hs, cs), 4)  # an even count: back where it started
            log(f"swap_neurons on layer {l}: {m} neurons in {t * 1e3:.1f} ms ({1e6 * t / m:.1f} us/neuron)")
            return t / m
    return None


# ---- the traces: the real model's firing, block by block, replayed in the decode loop ---------------
def load_traces(stats: Path, meta: dict[str, Any], L: int, n_ff: int) -> dict[str, list[dict[str, Any]]]:
    """traces.npz mapped onto the target as workloads.npz was (hotcold.workloads.frequencies.DepthMap with
    the statistics' seed): per eval, a list of sequences {prefill, continuation: [L, n_ff] frequencies,
    blocks: [(frequencies [L, n_ff], real tokens)], tokens}, in the profile's (logical) neuron order."""
    from hotcold.workloads.frequencies import DepthMap

    z = np.load(Path(stats) / "traces.npz")
    Ls, Fs = meta["source_shape"]
    m = DepthMap(int(Ls), int(Fs), int(meta["n_layers_mapped"]), int(meta["n_ff"]), seed=int(meta.get("seed", 0)))
    cut = lambda f: np.ascontiguousarray(m.apply(f)[:L, :n_ff], dtype=np.float32)  # noqa: E731
    out: dict[str, list[dict[str, Any]]] = {}
    for e in sorted({k.rsplit("/", 1)[0] for k in z.files}):
        pre, tok, blk, bseq, btok = (z[f"{e}/{k}"] for k in ("prefill", "tokens", "blocks", "block_seq", "block_tokens"))
        seqs = []
        for s_ in range(pre.shape[0]):
            bi = np.flatnonzero(bseq == s_)
            if not len(bi):
                continue
            n_tok = int(btok[bi].sum())
            seqs.append({"prefill": cut(pre[s_] / max(int(tok[s_, 0]), 1)),
                         "continuation": cut(blk[bi].astype(np.float64).sum(0) / max(n_tok, 1)),
                         "blocks": [(cut(blk[b] / max(int(btok[b]), 1)), int(btok[b])) for b in bi],
                         "tokens": n_tok})
        out[e] = seqs
    return out


def _restore(eng: Any, n_hot: tuple[int, ...]) -> None:
    """Back to the build's placement (ids below n_hot[l] hot), after a policy that moved neurons."""
    from hotcold.runtime.migrate import rehome

    for l, g in enumerate(eng.gl):
        if g.n_hot and eng.cl[l].n_cold and int(g.hot_ids.max()) >= n_hot[l]:
            rehome(eng, l, np.arange(n_hot[l]))


def _trace_run(eng: Any, selector: Any, seqs: list[dict[str, Any]], perm: np.ndarray, n_hot: tuple[int, ...],
               policy: str, sel_ratio: float, cm: Any, prior: np.ndarray, spec: dict[str, Any],
               predict: bool) -> dict[str, Any]:
    """One pass over an eval's trace with one policy. Each block of the real model's continuation sets the
    sampled predictor's probabilities (what fires; cold neurons selected sel_ratio times as often) and
    decodes `trace_tokens` timed steps. Policies act between steps, on the built model, timed:
      dynamic  hotcold.runtime.dynamic.DynamicPlacement fed each block's real counts (observe), then its
               decision and its migration (swap_neurons), as the runtime does every `every` tokens
      prompt   before each sequence, every layer re-homed to the prompt's own top set (its prefill counts)
      oracle   the same with the continuation's top set (not runnable; its moves are not charged)
    The stall (decisions and moves) is charged per real continuation token of the trace; the decode time
    per timed step."""
    from hotcold.bench.fits import predict_ms
    from hotcold.bench.runs import hot_mask
    from hotcold.runtime.migrate import rehome

    L, n_ff = eng.L, eng.cfg.n_ff
    _restore(eng, n_hot)
    order = lambda f: np.take_along_axis(f, perm, axis=1)  # noqa: E731 - logical -> the model's ids
    dyn = None
    if policy == "dynamic":
        from hotcold.runtime.dynamic import DynamicPlacement

        block = max(int(np.median([bt for sq in seqs for _, bt in sq["blocks"]])), 1)
        dyn = DynamicPlacement(eng, cm, order(prior), every=block)
        dyn.enabled, eng.stats_on = False, False  # fed by observe(), not by the engine's counters
    a = {k: 0.0 for k in ("decode_s", "cpu_kernel_s", "cpu_bytes", "cold_active", "stall_s", "unpaid_s",
                          "real_tokens", "caught", "fired", "cold_fired", "cold_selected", "pred")}
    steps, moved, moved_bytes, tpb = 0, 0, 0, int(spec.get("trace_tokens") or 1)
    eng.reset()
    eng.step(1)
    try:
        for sq in seqs:
            if eng.host_pos + len(sq["blocks"]) * tpb >= eng.max_len:  # a fresh context when the next would not fit
                eng.reset()
                eng.step(1)
            if policy in ("prompt", "oracle"):
                key = order(sq["prefill" if policy == "prompt" else "continuation"])
                t0 = time.perf_counter()
                for l in range(L):
                    k = int(n_hot[l])
                    if 0 < k < n_ff:
                        ms = rehome(eng, l, np.argpartition(-key[l], k - 1)[:k])
                        moved += ms.neurons
                        moved_bytes += ms.bytes
                a["stall_s" if policy == "prompt" else "unpaid_s"] += time.perf_counter() - t0
            for w_log, bt in sq["blocks"]:
                w = order(w_log)
                hm = hot_mask(eng)
                sel = np.where(hm, w, np.minimum(w * sel_ratio, 1.0))
                selector.set_probabilities(sel)
                for _ in range(tpb):
                    st = eng.step(None)
                    a["decode_s"] += st.seconds
                    a["cpu_kernel_s"] += st.cpu_kernel_s
                    a["cpu_bytes"] += st.cpu_bytes
                    a["cold_active"] += st.cold_active
                    steps += 1
                a["real_tokens"] += bt
                a["caught"] += float((w * hm).sum()) * bt
                a["fired"] += float(w.sum()) * bt
                a["cold_fired"] += float((w * ~hm).sum()) * bt
                a["cold_selected"] += float((sel * ~hm).sum()) * bt
                if predict:
                    a["pred"] += predict_ms(cm, sel, hm)["ms_per_token"] * bt
                if dyn is not None:
                    t0 = time.perf_counter()
                    dyn.observe(w)
                    dyn.migrate(dyn.decide())
                    a["stall_s"] += time.perf_counter() - t0
    finally:
        if dyn is not None:
            eng.hooks.remove(dyn)
            eng.stats_on = False
    if dyn is not None:
        moved, moved_bytes = dyn.stats.neurons, dyn.stats.bytes
    n_cold = sum(c.n_cold for c in eng.cl)
    rt = max(a["real_tokens"], 1.0)
    return {"ms_per_token": 1e3 * a["decode_s"] / max(steps, 1), "timed_steps": steps,
            "real_tokens": int(a["real_tokens"]), "sequences": len(seqs),
            "blocks": sum(len(sq["blocks"]) for sq in seqs),
            "stall_ms_per_token": 1e3 * a["stall_s"] / rt, "unpaid_ms_per_token": 1e3 * a["unpaid_s"] / rt,
            "neurons_moved": int(moved), "bytes_moved": int(moved_bytes),
            "cpu_kernel_ms_per_token": 1e3 * a["cpu_kernel_s"] / max(steps, 1),
            "cpu_GBps": a["cpu_bytes"] / a["cpu_kernel_s"] / 1e9 if a["cpu_kernel_s"] else None,
            "cpu_MB_per_token": a["cpu_bytes"] / max(steps, 1) / 1e6,
            "cold_active_per_token": a["cold_active"] / max(steps, 1),
            "measured_cold_selected_fraction": a["cold_active"] / max(steps, 1) / max(n_cold, 1),
            "gpu_share_of_activations": a["caught"] / max(a["fired"], 1e-12),
            "expected_cold_active_per_token": a["cold_fired"] / rt,
            "expected_cold_selected_per_token": a["cold_selected"] / rt,
            "predicted_ms_per_token": a["pred"] / rt if predict else None,
            "dynamic_decisions": dyn.stats.decisions if dyn is not None else None}


def _run_traces(eng: Any, selector: Any, members: list[tuple[str, np.ndarray]], traces: dict[str, list],
                f_place: np.ndarray, n_hot: tuple[int, ...], sel_ratio: float, cm: Any, spec: dict[str, Any],
                log: Log, done: Callable[[str, dict[str, Any]], None]) -> None:
    """Every (policy, eval) of one build over the traces, rounds interleaved (round r starts r policies
    later), so a drift of the host over the call does not favour the policies that run late."""
    from hotcold.bench.runs import run_engine

    run_engine(eng, 2, 2, gpu_probe=0)  # capture, warm
    perms = {p: hot_first(f_place, hot) for p, hot in members}
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    R = int(spec["rounds"])

    def summarize() -> None:
        """Every (policy, eval) over the rounds so far, through done(): after each round, so a run cut short
        by a deadline leaves its finished rounds (rounds_done says how many)."""
        for (p, e), rs in got.items():
            ms = [x["ms_per_token"] for x in rs]
            stall = [x["stall_ms_per_token"] for x in rs]
            tot = [m + s_ for m, s_ in zip(ms, stall)]
            r0 = dict(rs[0])
            r0.update({"mode": "trace", "rounds_done": len(rs), "rounds_ms_per_token": ms,
                       "ms_per_token": float(np.median(ms)),
                       "ms_per_token_spread": [float(min(ms)), float(max(ms))],
                       "rounds_stall_ms_per_token": stall, "rounds_total_ms_per_token": tot,
                       "total_spread": [float(min(tot)), float(max(tot))],
                       "cpu_GBps": float(np.median([x["cpu_GBps"] or 0.0 for x in rs])),
                       "rounds_cpu_GBps": [x["cpu_GBps"] for x in rs]})
            r0["migration"] = {"neurons_per_token": r0["neurons_moved"] / max(r0["real_tokens"], 1),
                               "bytes_per_token": r0["bytes_moved"] / max(r0["real_tokens"], 1),
                               "stall_ms_per_token": float(np.median(stall)),
                               "unpaid_ms_per_token": r0["unpaid_ms_per_token"],
                               "note": {"dynamic": "DynamicPlacement's decisions and swap_neurons moves, timed in the loop, "
                                                   "per real continuation token of the trace",
                                        "prompt": "re-homing every layer to the prompt's top set before each sequence, "
                                                  "timed, per real continuation token",
                                        "oracle": "re-homing to the continuation's own top set: timed but not charged "
                                                  "(known only after the continuation)"}.get(p, "no migration")}
            r0["ms_per_token_with_migration"] = float(np.median(tot))
            done(f"{p}@{e}", r0)
    for r in range(R):
        k = r % len(members)
        for p, _ in members[k:] + members[:k]:
            for e, seqs in traces.items():
                rr = _trace_run(eng, selector, seqs, perms[p], n_hot, p, sel_ratio, cm, f_place, spec, predict=r == 0)
                got.setdefault((p, e), []).append(rr)
                log(f"  round {r + 1}/{R} {p}@{e}: {rr['ms_per_token']:.1f} ms/token + {rr['stall_ms_per_token']:.2f} "
                    f"stall, GPU share of activations {rr['gpu_share_of_activations']:.3f}")
        summarize()
    _restore(eng, n_hot)


def _run_policy(eng: Any, selector: Any, probs: np.ndarray | None, spec: dict[str, Any]) -> dict[str, Any]:
    from hotcold.bench.runs import run_engine

    if selector is not None:
        selector.set_probabilities(probs)
    r = run_engine(eng, spec["tokens"], spec["warm"])
    rounds = [r["ms_per_token"]]
    for _ in range(spec["rounds"] - 1):
        rounds.append(run_engine(eng, spec["tokens"], 2, gpu_probe=0)["ms_per_token"])
    r["rounds_ms_per_token"] = rounds
    r["ms_per_token"] = float(np.median(rounds))
    r["ms_per_token_spread"] = [float(min(rounds)), float(max(rounds))]
    return r


# ---- the parent: one command ------------------------------------------------------------------------
def run_scale(c: ScaleConfig, log: Log = _log) -> dict[str, Any]:
    """Rates (own process on CUDA), then one process per (scenario, budget); the result JSON and the report
    are rewritten as runs arrive."""
    from hotcold.bench.harness import save_json

    c.validate()
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"kind": "study-scale", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": c.to_json(),
                           "weights": "random quantized bytes generated on the device; not a trained model",
                           "cells": {}}
    meta = Path(c.stats) / "workloads.json"
    res["statistics"] = json.loads(meta.read_text()) if meta.exists() else None
    path = out / "study_scale.json"
    t0 = time.perf_counter()
    rates: dict[str, Any] = {}
    hw = None
    if c.device == "cuda":
        log("measuring rates (own process)")
        rp = out / ".rates.json"
        p = subprocess.run([sys.executable, "-m", "hotcold.study.scale", "--rates", str(rp), c.shape, c.quant,
                            str(c.cpu_threads or 0)], text=True)
        rates = json.loads(rp.read_text()) if p.returncode == 0 and rp.exists() else {}
        rp.unlink(missing_ok=True)
        if rates:
            hw = machine_spec(rates)
    res["rates"] = rates
    if hw is not None:
        res["hardware_for_predictions"] = hw.to_json()
    from hotcold.memory import parse_bytes

    slack = parse_bytes(c.slack, "slack")
    mig = None
    if rates.get("migrate"):
        mig = rates["migrate"]["2048"]["seconds"] / 2048
    save_json(res, path)
    for scen in c.scenarios:
        for budget in c.budgets:
            key = f"{scen}@{budget}"
            if c.cells and key not in c.cells:
                continue
            spec = {"scenario": scen, "budget": budget, "shape": c.shape, "layers": c.layers, "quant": c.quant,
                    "ctx_len": c.ctx_len, "rank": c.predictor_rank, "stats": str(c.stats), "slack": slack,
                    "policies": list(c.policies), "tokens": c.tokens, "warm": c.warm, "rounds": c.rounds,
                    "relu_density": c.relu_density, "seed": c.seed, "device": c.device, "cpu_threads": c.cpu_threads,
                    "time_limit": c.time_limit, "hw": hw.to_json() if hw else None, "selected_over_active": 1.5,
                    "migrate_s_per_neuron": mig, "trace_tokens": c.trace_tokens, "result": str(out / f".{key}.json")}
            sp = out / f".{key}.spec.json"
            sp.write_text(json.dumps(spec))
            log(f"cell {key}")
            with NvSampler() as nv:
                p = subprocess.run([sys.executable, "-m", "hotcold.study.scale", "--child", str(sp)],
                                   stderr=subprocess.PIPE, text=True)
            for line in p.stderr.splitlines()[-40:]:
                log(f"  {line}")
            rp = Path(spec["result"])
            part = Path(spec["result"] + ".partial")
            if p.returncode != 0 or not rp.exists():
                res["cells"][key] = {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-3000:]}
                if part.exists():  # the runs it finished
                    res["cells"][key] = {**json.loads(part.read_text()), **res["cells"][key], "incomplete": True}
                    res["cells"][key]["gpu_peak_GiB"] = nv.peak / 1024 if nv.peak else None
            else:
                r = json.loads(rp.read_text())
                r["gpu_mib_peak_nvidia_smi"] = nv.peak or None
                r["gpu_peak_GiB"] = nv.peak / 1024 if nv.peak else None
                res["cells"][key] = r
                rp.unlink()
            part.unlink(missing_ok=True)
            sp.unlink(missing_ok=True)
            res["elapsed_s"] = time.perf_counter() - t0
            res["summary"] = summarize(res)
            save_json(res, path)
            write_report(res, out)
    log(f"wrote {path} and {out / 'report.md'}")
    return res


# ---- the answer ---------------------------------------------------------------------------------------
def summarize(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (cell, eval, policy): ms/token (median, spread), with migration, vs fixed, and whether
    the difference exceeds the run-to-run spread of the two."""
    rows = []
    for key, cell in res["cells"].items():
        runs = cell.get("runs") or {}
        for rk, r in runs.items():
            p, e = (rk.split("@") + ["-"])[:2]
            base = runs.get(f"fixed@{e}")
            row = {"cell": key, "eval": e, "policy": p, "ms_per_token": r["ms_per_token"],
                   "spread": r.get("ms_per_token_spread"), "with_migration": r.get("ms_per_token_with_migration"),
                   "gpu_share_of_activations": r.get("gpu_share_of_activations"),
                   "gpu_peak_GiB": cell.get("gpu_peak_GiB"), "predicted": r.get("predicted_ms_per_token")}
            if base:
                row["speedup_vs_fixed"] = base["ms_per_token"] / r["ms_per_token_with_migration"]
                lo_b, hi_b = base.get("total_spread") or base["ms_per_token_spread"]
                lo, hi = r.get("total_spread") or r["ms_per_token_spread"]
                row["beyond_spread"] = bool(hi < lo_b) or bool(lo > hi_b)
                rb, rp = base.get("rounds_total_ms_per_token"), r.get("rounds_total_ms_per_token")
                if rb and rp and len(rb) == len(rp):  # trace mode: rounds interleaved, so paired
                    row["paired_speedups"] = [b / x for b, x in zip(rb, rp)]
            rows.append(row)
    return rows


def write_report(res: dict[str, Any], out: Path) -> Path:
    """report.md (the tables) and policies.png (ms/token per policy, per cell and eval) in `out`."""
    lines = ["# Placement policies at scale (hotcold study --scale)", "",
             f"`{res['command']}` — {res['date']}. Weights: {res['weights']}.", ""]
    stats = res.get("statistics") or {}
    if stats:
        profs = "; ".join(f"{k}: {v.get('model')} ({(v.get('dataset') or {}).get('split', '')})"
                          for k, v in (stats.get("profiles") or {}).items())
        lines += [f"Statistics: {profs}; {stats.get('mapping', '')}.", ""]
    for key, cell in res["cells"].items():
        lines.append(f"## {key}")
        if "error" in cell:
            lines += ["", f"failed: {cell['error']}" + (" (the runs below finished before it stopped)"
                                                         if cell.get("runs") else ""), ""]
            if not cell.get("runs"):
                continue
        lines += ["", f"{cell.get('budget_note', '')}; {cell['neurons_that_fit']:,} neurons fit; peak GPU "
                      f"{cell.get('gpu_peak_GiB') or 0:.2f} GiB (nvidia-smi, the whole process); "
                      f"workload: {cell['workload']['kind']}.", ""]
        if cell.get("note"):
            lines += [cell["note"], ""]
        lines += ["| policy | eval | GPU neurons | GPU share of activations | ms/token (median) | spread | "
                  "migration ms/token | total | vs fixed | modelled |", "|---|---|---|---|---|---|---|---|---|---|"]
        runs = cell.get("runs") or {}
        for rk, r in runs.items():
            p, e = (rk.split("@") + ["-"])[:2]
            base = runs.get(f"fixed@{e}")
            vs = f"{base['ms_per_token'] / r['ms_per_token_with_migration']:.3f}x" if base else "—"
            lo, hi = r["ms_per_token_spread"]
            lines.append(f"| {p} | {e} | {r['n_hot_total']:,} | {r['gpu_share_of_activations']:.3f} | "
                         f"{r['ms_per_token']:.1f} | {lo:.1f}–{hi:.1f} | {r['migration']['stall_ms_per_token']:.2f} | "
                         f"{r['ms_per_token_with_migration']:.1f} | {vs} | {r['predicted_ms_per_token']:.1f} |")
        for p, why in (cell.get("skipped") or {}).items():
            lines.append(f"| {p} | — | — | — | not run: {why} | | | | | |")
        tr = (cell.get("workload") or {}).get("traces")
        if tr:
            lines += ["", "Every policy decoded over the same traces: " + "; ".join(
                f"{e}: {t['sequences']} sequences, {t['blocks']} blocks, {t['real_tokens']} real tokens, "
                f"{t['timed_steps_per_block']} timed step(s) per block" for e, t in tr.items()) +
                ". Rounds are interleaved (round r starts r policies later); migration is the policy's own "
                "decisions and moves, timed in the loop and charged per real token; `paired` is fixed's round "
                "over the policy's round, round by round."]
            pairs = {(row["eval"], row["policy"]): row.get("paired_speedups")
                     for row in res.get("summary") or summarize(res) if row["cell"] == key}
            pl = [f"{p}@{e} {', '.join(f'{v:.3f}' for v in v_)}" for (e, p), v_ in pairs.items() if v_ and p != "fixed"]
            if pl:
                lines += ["", "Paired speed-ups over fixed (per round): " + "; ".join(pl) + "."]
        lines += ["", "The spread is between rounds of one build; policies of equal GPU share of activations do "
                      "the same work, and their ms/token differences measure the builds and the host, not the "
                      "placement (compare calls before reading a ratio)."]
        rep = cell.get("replay") or {}
        for e, f in rep.items():
            lines += ["", f"Hot-set replay on the real model itself (`hotcold profile hotsets`, {e}, all its sequences, "
                          f"share {f['share']:.3f}): GPU share of activations fixed {f['fixed_caught_overall']:.3f}, " +
                      ", ".join(f"{p} {v['caught_overall']:.3f}" for p, v in f["policies"].items()) +
                      f"; oracle / fixed = {f['oracle_over_fixed']:.3f} (the ceiling of any per-prompt hot set)."]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        plot_policies(res, out / "policies.png")
    except Exception as ex:  # noqa: BLE001 - a report without its plot still has the tables
        _log(f"plot skipped: {ex}")
    return out / "report.md"


def plot_policies(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(k, c) for k, c in res["cells"].items() if c.get("runs") and not c.get("all_fit")]
    if not cells:
        return path
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3.6), squeeze=False)
    for ax, (key, cell) in zip(axes[0], cells):
        names = list(cell["runs"])
        ms = [cell["runs"][n]["ms_per_token"] for n in names]
        mig = [cell["runs"][n]["migration"]["stall_ms_per_token"] for n in names]
        err = np.array([[m - cell["runs"][n]["ms_per_token_spread"][0], cell["runs"][n]["ms_per_token_spread"][1] - m]
                        for n, m in zip(names, ms)]).T
        x = np.arange(len(names))
        ax.bar(x, ms, yerr=err, capsize=3, label="decode")
        ax.bar(x, mig, bottom=ms, label="migration")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ms/token")
        ax.set_title(key, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("random weights; firing from real profiles (swiglu) or synthetic (relu)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    from hotcold.bench.harness import save_json

    if argv[:1] == ["--rates"]:
        out, shape, quant, thr = argv[1:5]
        save_json(measure_rates(shape, quant, int(thr) or None), Path(out))
        return
    if argv[:1] == ["--child"]:
        spec = json.loads(Path(argv[1]).read_text())
        save_json(child(spec), Path(spec["result"]))
        return
    raise SystemExit("usage: python -m hotcold.study.scale --rates OUT SHAPE QUANT THREADS | --child SPEC")


if __name__ == "__main__":
    main(sys.argv[1:])
