"""`hotcold study`: profile once, then solve, export and run every (budget, policy) and measure it.

For each GPU budget and policy the study writes a Placement and a Bundle, runs the Bundle through the
hybrid runtime, and records: modelled ms/token (the solver's cost model), measured ms/token (prefill and
decode), GPU/CPU memory (the memory account, and peak RSS of the run), the GPU share of activated
neurons, and quality against the dense model on held-out prompts (next-token agreement and KL on the
reference solutions, teacher-forced; perplexity of the reference solutions; optionally pass@1 on the
tasks' asserts, run in the sandbox).

Budgets are given as bytes ("2GiB") or as `ffn:F` — the placement-independent GPU bytes (attention,
embeddings, KV cache, buffers) plus the fraction F of all FFN bytes — so one study definition scales to
any model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hotcold.errors import InputError

Log = Callable[[str], None]


@dataclass
class StudyConfig:
    model: str = "smollm2-135m"
    dataset: str = "mbpp"  # mbpp, mbpp:PATH, embedded, jsonl:PATH
    profile_split: str | None = "train"
    eval_split: str | None = "test"
    profile_limit: int = 24
    eval_limit: int = 6
    profile_mode: str = "teacher-forced"
    sparsity: float = 0.5  # activation sparsity t_l is calibrated for (profile and runtime)
    budgets: list[str] = field(default_factory=lambda: ["ffn:0.1", "ffn:0.3", "ffn:0.6"])
    policies: list[str] = field(default_factory=lambda: ["fixed", "adaptive"])
    hardware: str = "pc-high"  # target of the cost model: a preset, a spec JSON, or "calibrate" (this machine, ~5 s)
    cold_mode: str = "threshold"
    thresholds: list[str] = field(default_factory=lambda: ["layer"])  # layer: per-layer t_l at the target
    # sparsity (from the profile's histograms); global: one t for every layer (the median of the per-layer ones)
    dtype: str = "float32"
    device: str = "auto"  # where the dense reference, the profiler and the runtime's GPU part run
    engine: str = "auto"  # kept for old configs: every run uses the one runtime (hotcold.runtime)
    ctx_len: int = 512
    speed_prompt_tokens: int = 64
    speed_new_tokens: int = 32
    pass_at_1: int = 0  # tasks to generate and test per run (0: skip; slow on a CPU)
    max_new_tokens: int = 192  # pass@1 generation length
    out: Path = Path("hotcold-study")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class RunRow:
    name: str
    policy: str
    budget: str
    gpu_budget_bytes: int
    solver_status: str
    solve_seconds: float
    n_hot_fraction: float
    gpu_bytes: int
    cpu_bytes: int
    modelled_ms_per_token: float
    measured_decode_ms_per_token: float
    measured_prefill_ms_per_token: float
    gpu_share_of_active: float | None
    active_fraction: float | None
    peak_rss_bytes: int
    agreement: float
    kl: float
    perplexity: float
    dense_perplexity: float
    pass_at_1: float | None
    placement: str
    bundle: str
    migration: dict[str, Any] | None
    taus: list[float | None]
    thresholds_kind: str
    engine: str = "runtime"
    skipped_fraction: float | None = None  # FFN neurons not computed per token (hot and cold), decode
    peak_gpu_bytes: int | None = None  # torch's peak CUDA allocation during the run (None on a CPU)
    hot_neurons: str = "dense"  # threshold mode: hot neurons computed densely, or thresholded like cold ones


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak_gpu(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_gpu(device: str) -> int | None:
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())


def _skipped_runtime(hot_fraction: float, decode: dict[str, Any]) -> float | None:
    """The runtime computes hot neurons densely and the active cold ones: the rest is skipped."""
    act, share = decode.get("active_fraction"), decode.get("gpu_share")
    if act is None or share is None:
        return None
    return max(0.0, 1.0 - hot_fraction - act * (1.0 - share))


def parse_budget(spec: str, fixed_gpu: int, ffn_total: int) -> int:
    from hotcold.memory import parse_bytes

    if spec.startswith("ffn:"):
        try:
            frac = float(spec[4:])
        except ValueError:
            raise InputError(f"budget {spec!r} is not ffn:FRACTION", "write e.g. ffn:0.3") from None
        if not 0.0 <= frac <= 1.0:
            raise InputError(f"budget {spec!r}: the fraction must be in [0, 1]", "write e.g. ffn:0.3")
        return fixed_gpu + int(frac * ffn_total)
    return parse_bytes(spec, "GPU budget")


def parse_policy(spec: str) -> tuple[str, float | None]:
    """'fixed', 'fixed:tau=0.2', 'impact', 'adaptive', 'dynamic' -> (policy, tau).

    `dynamic` starts from the `fixed` placement of the same budget and lets the runtime move neurons
    between GPU and CPU while it generates (hotcold.runtime.dynamic), so its GPU memory is fixed's.
    """
    name, _, rest = spec.partition(":")
    if name not in ("fixed", "impact", "adaptive", "dynamic"):
        raise InputError(f"unknown policy {spec!r} in --policies", "use fixed, fixed:tau=T, impact, adaptive or dynamic")
    tau = None
    if rest:
        key, _, val = rest.partition("=")
        if name != "fixed" or key != "tau":
            raise InputError(f"policy {spec!r}: only fixed takes a parameter (fixed:tau=T)", "e.g. fixed:tau=0.2")
        tau = float(val)
    return name, tau


def eval_sequences(tok, tasks, limit: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + reference solution, index of the first solution token) per task."""
    from hotcold.workloads import teacher_forced

    seqs = []
    for t in tasks[:limit]:
        prompt, cont = teacher_forced(t, style="chat", render_chat=tok.render_chat)
        p_ids = tok.encode(prompt)
        c_ids = tok.encode(cont, add_bos=False)
        seqs.append((p_ids + c_ids, len(p_ids)))
    return seqs


def teacher_forced_logits(model, seqs: list[tuple[list[int], int]]):
    """Per sequence: logits predicting each reference-solution token [n_cont, V], and the targets."""
    import torch

    out = []
    for ids, start in seqs:
        logits = model.forward(torch.tensor([ids]), 0, model.new_cache(1, len(ids)))[0]
        out.append((logits[start - 1:-1].float(), torch.tensor(ids[start:])))
    return out


def measure_decode(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill ms/token, decode ms/token) of greedy generation, warm-up excluded."""
    from hotcold.model.generate import generate

    def gen(ids, n):
        return model.generate(ids, n) if hasattr(model, "step") else generate(model, ids, n)

    gen(prompt_ids[:8], 2)  # warm-up (graph capture, kernel compilation)
    g = gen(prompt_ids, new_tokens)
    prefill = 1e3 * g.prefill_seconds / max(len(prompt_ids), 1)
    decode = 1e3 / g.decode_tokens_per_s if g.decode_tokens_per_s else float("nan")
    return prefill, decode


def run_study(cfg: StudyConfig, log: Log = lambda s: None, progress: Callable[[str, int, int], None] | None = None
              ) -> dict[str, Any]:
    """Run the study; write everything under cfg.out; return the results object (also results.json)."""
    import torch

    from hotcold.exporter import ExportOptions, export_bundle
    from hotcold.memory import neuron_bytes, placement_bytes
    from hotcold.model.dense import DenseModel
    from hotcold.model.registry import load_source
    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.engine import ProfileOptions, profile_dataset
    from hotcold.quality.metrics import compare_logits, perplexity
    from hotcold.runtime.build import from_bundle
    from hotcold.solver.hardware import calibrate, resolve
    from hotcold.solver.solve import solve
    from hotcold.workloads import load_dataset

    for pol in cfg.policies:  # fail on a bad definition before any work
        parse_policy(pol)
    for b in cfg.budgets:
        parse_budget(b, 0, 0)
    bad = [t for t in cfg.thresholds if t not in ("layer", "global")]
    if bad:
        raise InputError(f"unknown threshold kind {bad[0]!r}", "use layer, global or layer,global")
    if not cfg.policies or not cfg.budgets:
        raise InputError("the study has no policies or no budgets", "pass --policies and --budgets")
    device = resolve_device(cfg.device)
    if cfg.engine not in ("auto", "runtime"):
        raise InputError(f"--engine {cfg.engine}: there is one runtime now (hotcold.runtime), on every device",
                         "drop --engine")
    engine = "runtime"
    from hotcold.profiler.engine import DTYPES

    if cfg.dtype not in DTYPES:
        raise InputError(f"unknown dtype {cfg.dtype!r}", f"use one of: {', '.join(DTYPES)}")
    tdtype = DTYPES[cfg.dtype]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda what, i, n: None)
    t_start = time.perf_counter()
    src = load_source(cfg.model)
    tok = src.tokenizer()
    if tok is None:
        raise InputError(f"{src.description} has no tokenizer", "use a model with a tokenizer")
    mcfg = src.config

    # 1. hardware
    if cfg.hardware == "calibrate":
        hw = calibrate(dtype=cfg.dtype, seconds=4.0, log=log)
        hw.save(out / "hardware.json")
    else:
        hw = resolve(path=cfg.hardware) if cfg.hardware.endswith(".json") else resolve(preset_name=cfg.hardware)

    # 2. profile once (train split), reused when its inputs are unchanged
    prof_dir = out / "profile"
    prof_key = {"model": src.fingerprint, "dataset": cfg.dataset, "split": cfg.profile_split,
                "limit": cfg.profile_limit, "mode": cfg.profile_mode, "sparsity": cfg.sparsity}
    key_file = out / "profile.key.json"
    from hotcold.profiler.artifact import Profile

    if prof_dir.is_dir() and key_file.is_file() and json.loads(key_file.read_text()) == prof_key:
        profile = Profile.load(prof_dir)
        log(f"reusing profile {prof_dir}")
    else:
        log(f"profiling {cfg.model} on {cfg.dataset} {cfg.profile_split} ({cfg.profile_limit} prompts, {cfg.profile_mode})")
        opts = ProfileOptions(mode=cfg.profile_mode, activation=ActivationSpec(kind="product", sparsity=cfg.sparsity),
                              samples=2048, batch_size=4, device=device,
                              dtype="float32" if device == "cpu" else cfg.dtype)
        res = profile_dataset(src, cfg.dataset, cfg.profile_split, limit=cfg.profile_limit, opts=opts, out=prof_dir,
                              progress=lambda done, total, tokens: step("profile", int(done), int(total)))
        profile = res.profile
        key_file.write_text(json.dumps(prof_key))

    # 3. the dense reference on held-out prompts
    eval_tasks = list(load_dataset(cfg.dataset, cfg.eval_split, limit=max(cfg.eval_limit, cfg.pass_at_1 or 0)))
    seqs = eval_sequences(tok, eval_tasks, cfg.eval_limit)
    dense = DenseModel.from_source(src, dtype=tdtype, device=device, max_len=cfg.ctx_len)
    dense_tf = teacher_forced_logits(dense, seqs)
    dense_ppl = float(np.mean([perplexity(lg, tg) for lg, tg in dense_tf]))
    speed_ids = (seqs[0][0] * 4)[: cfg.speed_prompt_tokens]
    d_prefill, d_decode = measure_decode(dense, speed_ids, cfg.speed_new_tokens)
    dense_row = {"name": "dense", "measured_decode_ms_per_token": d_decode, "measured_prefill_ms_per_token": d_prefill,
                 "perplexity": dense_ppl, "weight_bytes": int(sum(
                     t.numel() * t.element_size() for lw in dense.layers for t in vars(lw).values() if t is not None)
                     + dense.embed.numel() * dense.embed.element_size())}
    dense_pass = None
    if cfg.pass_at_1:
        dense_pass = pass_rate(dense, tok, eval_tasks[: cfg.pass_at_1], cfg.max_new_tokens)
        dense_row["pass_at_1"] = dense_pass
    del dense

    # 4. budgets, policies: solve -> export -> run -> measure
    acct0 = placement_bytes(mcfg, [0] * mcfg.n_layers, cfg.dtype, ctx_len=cfg.ctx_len, cold_mode=cfg.cold_mode)
    ffn_total = mcfg.n_layers * mcfg.n_ff * neuron_bytes(mcfg, cfg.dtype).total
    rows: list[RunRow] = []
    runs = [(b, p, t) for b in cfg.budgets for p in cfg.policies for t in cfg.thresholds]
    placements: dict[tuple[str, str], Any] = {}
    for i, (budget, pol, tkind) in enumerate(runs):
        policy, tau = parse_policy(pol)
        gpu_budget = parse_budget(budget, acct0.gpu_total, ffn_total)
        name = f"{pol.replace(':', '-').replace('=', '')}@{budget.replace(':', '')}"
        pl_name = name
        if len(cfg.thresholds) > 1:
            name += f"+t{tkind}"
        step(f"{name}", i, len(runs))
        log(f"[{i + 1}/{len(runs)}] {name}: solve with GPU budget {gpu_budget / 2**20:.1f} MiB")
        pl_dir = out / "placements" / pl_name
        base = "fixed" if policy == "dynamic" else pol
        if (budget, base) not in placements:  # one placement serves every threshold kind (and dynamic)
            pl = solve(profile, hw, policy="fixed" if policy == "dynamic" else policy, gpu_budget=gpu_budget,
                       tau=tau, cold_mode=cfg.cold_mode, ctx_len=cfg.ctx_len, dtype=cfg.dtype, time_limit=30.0)
            pl = pl.save(pl_dir)
            placements[(budget, base)] = pl
        pl = placements[(budget, base)]
        b_dir = out / "bundles" / (f"{pl_name.replace('dynamic', 'fixed')}" + (f"+t{tkind}" if len(cfg.thresholds) > 1 else ""))
        thresholds = None
        if tkind == "global":
            thresholds = float(np.median(profile.magnitude_thresholds(cfg.sparsity)))
        if not (b_dir / "manifest.json").is_file():
            export_bundle(src, pl, b_dir, profile=profile,
                          options=ExportOptions(dtype=cfg.dtype, rule="gate", sparsity=cfg.sparsity,
                                                threshold=thresholds, ctx_len=cfg.ctx_len))
        if policy == "dynamic":
            rows.append(run_engine(cfg, profile, hw, pl, b_dir, name, pol, budget, gpu_budget, tkind, seqs,
                                   dense_tf, dense_ppl, speed_ids, device, dynamic=policy == "dynamic"))
            step(f"{name}", i + 1, len(runs))
            continue
        _reset_peak_gpu(device)
        hm = from_bundle(b_dir, mode=cfg.cold_mode, device=device, max_len=cfg.ctx_len, prefill="sparse")
        tf = teacher_forced_logits(hm, seqs)
        comps = [compare_logits(d[0], h[0]) for d, h in zip(dense_tf, tf)]
        agree = float(np.average([c.agreement for c in comps], weights=[len(d[1]) for d in dense_tf]))
        kl = float(np.average([c.kl_mean for c in comps], weights=[len(d[1]) for d in dense_tf]))
        ppl = float(np.mean([perplexity(lg, tg) for lg, tg in tf]))
        hm.reset_stats()
        m_prefill, m_decode = measure_decode(hm, speed_ids, cfg.speed_new_tokens)
        rep = hm.report()
        decode = rep.get("decode") or {}
        pa1 = pass_rate(hm, tok, eval_tasks[: cfg.pass_at_1], cfg.max_new_tokens) if cfg.pass_at_1 else None
        tot = pl.totals
        rows.append(RunRow(
            name=name, policy=pol, budget=budget, gpu_budget_bytes=gpu_budget, solver_status=pl.status,
            solve_seconds=float(pl.manifest["solver"].get("seconds", 0.0)),
            n_hot_fraction=float(np.sum(pl.n_hot) / (mcfg.n_layers * mcfg.n_ff)),
            gpu_bytes=int(tot["gpu_bytes"]), cpu_bytes=int(tot["cpu_bytes"]),
            modelled_ms_per_token=float(tot["modelled_ms_per_token"]),
            measured_decode_ms_per_token=m_decode, measured_prefill_ms_per_token=m_prefill,
            gpu_share_of_active=decode.get("gpu_share"),
            active_fraction=decode.get("active_fraction"), peak_rss_bytes=_peak_rss(),
            skipped_fraction=_skipped_runtime(float(np.sum(pl.n_hot) / (mcfg.n_layers * mcfg.n_ff)), decode),
            peak_gpu_bytes=_peak_gpu(device),
            agreement=agree, kl=kl, perplexity=ppl, dense_perplexity=dense_ppl, pass_at_1=pa1,
            placement=str(pl_dir), bundle=str(b_dir), migration=None, taus=pl.taus, thresholds_kind=tkind))
        del hm
        step(f"{name}", i + 1, len(runs))
    results = {"kind": "study", "config": cfg.to_json(), "hardware": hw.to_json(), "dense": dense_row,
               "model": {"source": src.description, "fingerprint": src.fingerprint, "config": mcfg.to_json()},
               "profile": {"path": str(prof_dir), "content_hash": profile.content_hash,
                           "token_count": profile.token_count},
               "runs": [asdict(r) for r in rows], "seconds": time.perf_counter() - t_start,
               "device": device, "engine": engine,
               "gpu_name": torch.cuda.get_device_name() if device == "cuda" else None,
               "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' (hotcold.devices.resolve_device's checks)."""
    from hotcold.devices import resolve_device as resolve

    return resolve(device).type


def _engine_decode(eng, speed_ids: list[int], n: int, rounds: int = 3) -> float:
    """Median over `rounds` of greedy decode ms/token after a prefill (one warm-up round first: graph
    capture, kernel compilation and tuning)."""
    import statistics

    times = []
    eng.capture()
    for r in range(rounds + 1):
        eng.prefill(speed_ids)
        t0 = time.perf_counter()
        for _ in range(n if r else 4):
            eng.step(None)
        if r:
            times.append(1e3 * (time.perf_counter() - t0) / n)
    return statistics.median(times)


def pass_rate(model, tok, tasks, max_new_tokens: int) -> float:
    """pass@1 (greedy) of `model` on `tasks`: generate, extract the code, run the asserts in the sandbox."""
    from hotcold.model.generate import generate
    from hotcold.quality.extract import extract_code
    from hotcold.quality.sandbox import pass_at_1
    from hotcold.workloads import format_prompt

    completions = []
    for t in tasks:
        ids = tok.encode(format_prompt(t, style="chat", render_chat=tok.render_chat))
        if hasattr(model, "step"):  # the hybrid runtime: its own prefill + decode steps
            g = model.generate(ids, max_new_tokens, eos_ids=tok.eos_ids)
        else:
            g = generate(model, ids, max_new_tokens, eos_ids=tok.eos_ids)
        completions.append(extract_code(tok.decode(g.new_ids)))
    return float(pass_at_1(tasks, completions).rate)


def run_engine(cfg: StudyConfig, profile, hw, pl, b_dir: Path, name: str, pol: str, budget: str, gpu_budget: int,
               tkind: str, seqs, dense_tf, dense_ppl: float, speed_ids: list[int], device: str = "cpu",
               dynamic: bool = False) -> RunRow:
    """A Bundle run with online migration (DynamicPlacement) when `dynamic` — the fixed placement's bundle,
    so GPU memory stays fixed's.

    Quality: the model is teacher-forced token by token through its decode steps over the held-out
    sequences (migrations happen while it goes), its logits compared with the dense model's. Hot neurons
    are computed densely, as in the other rows. Speed: greedy decode after a prefill.
    """
    import torch

    from hotcold.runtime.build import from_bundle
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.quality.metrics import compare_logits, perplexity
    from hotcold.solver.costmodel import CostModel

    mcfg = pl.model_config
    _reset_peak_gpu(device)
    eng = from_bundle(b_dir, device=device, mode="threshold", max_len=cfg.ctx_len)
    dyn = None
    if dynamic:
        dyn = DynamicPlacement(eng, CostModel(mcfg, hw, cfg.dtype, cold_mode="threshold", ctx_len=cfg.ctx_len),
                               profile.frequencies("decode"), every=16)
    comps, ppls, weights = [], [], []
    hot_act = cold_act = 0.0
    for (ids, start), (d_logits, targets) in zip(seqs, dense_tf):
        eng.reset()
        got = []
        for t, tok in enumerate(ids[:-1]):
            st = eng.step(tok)
            if t >= start - 1:
                got.append(eng.logits.detach().float().cpu().clone())
                hot_act += float(eng.hot_active_dev.sum())
                cold_act += st.cold_active
        lg = torch.stack(got)
        comps.append(compare_logits(d_logits, lg))
        ppls.append(perplexity(lg, targets))
        weights.append(len(targets))
    tokens_seen = dyn.tokens_seen if dyn else 0  # steps the migration hook saw
    decode_ms = _engine_decode(eng, speed_ids, cfg.speed_new_tokens)
    n_hot = [g.n_hot for g in eng.gl]
    tot = pl.totals
    n_ff = mcfg.n_layers * mcfg.n_ff
    n_tok = sum(weights)
    return RunRow(
        name=name, policy=pol, budget=budget, gpu_budget_bytes=gpu_budget, solver_status=pl.status,
        solve_seconds=float(pl.manifest["solver"].get("seconds", 0.0)),
        n_hot_fraction=float(sum(n_hot) / n_ff), gpu_bytes=int(tot["gpu_bytes"]),
        cpu_bytes=int(tot["cpu_bytes"]), modelled_ms_per_token=float(tot["modelled_ms_per_token"]),
        measured_decode_ms_per_token=decode_ms, measured_prefill_ms_per_token=float("nan"),
        gpu_share_of_active=hot_act / max(hot_act + cold_act, 1.0),
        active_fraction=(hot_act + cold_act) / max(sum(weights) * n_ff, 1), peak_rss_bytes=_peak_rss(),
        skipped_fraction=1.0 - (sum(n_hot) * n_tok + cold_act) / max(n_tok * n_ff, 1), peak_gpu_bytes=_peak_gpu(device),
        agreement=float(np.average([c.agreement for c in comps], weights=weights)),
        kl=float(np.average([c.kl_mean for c in comps], weights=weights)), perplexity=float(np.mean(ppls)),
        dense_perplexity=dense_ppl, pass_at_1=None, placement=str(pl.path or ""), bundle=str(b_dir),
        migration=dyn.stats.to_json(max(tokens_seen, 1)) if dyn else None, taus=pl.taus, thresholds_kind=tkind,
        engine="runtime")
