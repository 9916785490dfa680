"""The hot-set measurement (`hotcold profile hotsets`): how much of a held-out workload's activations would
land on the GPU for a given share of neurons there, under each way of choosing the hot set.

Inputs: a Profile (the offline statistics a placement is solved from) and an evaluation Profile of the
same model made with per-sequence records (`profile run --per-sequence`, persequence.py) on held-out
prompts. Only the evaluation's continuation tokens are scored — the tokens a runtime decodes one at a
time, where the GPU/CPU split matters; its prompt tokens are what "prompt" below chooses from.

For each GPU share s (fraction of all FFN neurons on the GPU) and each hot-set choice, the result is
caught activations / all activations of the continuation tokens, per layer and overall (the overall
figure sums activations over layers: the GPU share of activated neurons a runtime would report):

    profile   each layer's top round(s·n_ff) neurons by the profile's frequencies (uniform share)
    fixed     the solver's `fixed` policy at the budget "dense tensors + s of the FFN bytes"
              (one global τ, PowerInfer's choice; hotcold.solver.solve_frequencies)
    adaptive  the solver's `adaptive` policy at the same budget (per-layer τ_l from its MILP under
              the cost model of `hardware`; it may leave part of the budget empty, and the table says
              how many neurons it placed)
    dynamic   `fixed`'s placement, then the runtime's dynamic mode replayed over the evaluation's
              continuation tokens, sequence after sequence: an EMA of per-block frequencies starting
              from the profile's, and every block the greedy swaps of its rule (see `DynamicRule`)
    prompt    per sequence, each layer's top set by that sequence's own prompt (prefill) counts,
              ties broken by the profile's frequencies: what a placement chosen after prefill holds
    oracle    per sequence, each layer's top set by the continuation's own counts (no static
              per-sequence choice catches more)
    oracle-workload  each layer's top set by the whole evaluation workload's continuation counts
    random    s, the expected share of any random set of that size (exact, no draw)
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hotcold.errors import IncompatibleError, InputError
from hotcold.profiler.activation import kind_of
from hotcold.profiler.artifact import Profile
from hotcold.profiler.persequence import decode_counts
from hotcold.workloads.frequencies import smallest

DEFAULT_SHARES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
CHOICES = ("profile", "fixed", "adaptive", "dynamic", "prompt", "oracle", "oracle-workload", "random")
STATIC = ("profile", "fixed", "adaptive")


# ---- the dynamic mode's rule -----------------------------------------------------------------------
DYNAMIC_MODULES = ("hotcold.runtime.dynamic", "hotcold.runtime.dynamic")  # where DynamicPlacement lives (or lived)
DYNAMIC_KEYS = ("every", "alpha", "hysteresis", "max_swaps", "horizon", "margin")


def dynamic_defaults() -> tuple[dict[str, Any], str]:
    """The runtime's DynamicPlacement keyword defaults (every, alpha, hysteresis, max_swaps, horizon,
    margin) and the file they were read from, so the replay follows the runtime. The class lives in
    hotcold/runtime/dynamic.py (formerly hotcold/accel/dynamic.py); either is accepted. Its source is
    parsed, not imported: importing it loads torch and the GPU engine, which the profiler never needs."""
    import ast
    import importlib.util

    for name in DYNAMIC_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            continue
        tree = ast.parse(Path(spec.origin).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "DynamicPlacement":
                init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                if init is None:
                    continue
                a = init.args
                pos = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
                kw = [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                found = {k.arg: ast.literal_eval(d) for k, d in pos + kw if k.arg in DYNAMIC_KEYS}
                if found:
                    return found, spec.origin
    raise InputError("the runtime's dynamic mode (class DynamicPlacement) was not found in "
                     + " or ".join(DYNAMIC_MODULES), "check the hotcold installation")


@dataclass(frozen=True)
class DynamicRule:
    """The dynamic mode's decision rule (hotcold/runtime/dynamic.py, DynamicPlacement._fold and .decide),
    re-derived over arrays so it can be replayed on recorded counts without an engine:

      fold    ema = (1 - alpha)·ema + alpha·(block counts / block tokens), once per block of `every`
              decode tokens, starting from the profile's frequencies;
      decide  per layer, pair the hottest cold neurons with the coldest hot ones; take pairs while the
              incoming EMA minus `margin` standard errors beats the outgoing one plus `margin` standard
              errors by the relative `hysteresis` (standard error sqrt(p(1-p)·alpha/((2-alpha)·every)));
              keep the prefix whose modelled saving over `horizon` tokens (cost model: max(T_gpu, T_cpu)
              before minus after) exceeds the copies' cost (2·neuron bytes / PCIe + 4·neuron bytes / CPU
              bandwidth per neuron), at most `max_swaps` a layer.
    Differences from the runtime: a block never spans two sequences (a sequence's last block may be
    shorter and is folded with its own token count), and a swap takes effect from the next block (the
    runtime commits at the first token after its copies finish: on a CPU the next token)."""

    every: int = 16
    alpha: float = 0.3
    hysteresis: float = 0.1
    max_swaps: int = 256
    horizon: int | None = None
    margin: float = 2.0

    @classmethod
    def from_runtime(cls, **override: Any) -> tuple[DynamicRule, str]:
        """The rule with the runtime's defaults (and the file they came from), `override` applied."""
        d, where = dynamic_defaults()
        d.update({k: v for k, v in override.items() if v is not None})
        return cls(**d), where

    @property
    def horizon_tokens(self) -> int:
        return self.horizon or 4 * self.every

    def decide(self, ema_hot: np.ndarray, ema_cold: np.ndarray, cm: Any) -> tuple[np.ndarray, np.ndarray]:
        """(hot positions to evict, cold positions to bring in) for one layer, equal lengths."""
        none = np.zeros(0, np.int64)
        m = min(self.max_swaps, len(ema_hot), len(ema_cold))
        if m == 0:
            return none, none
        noise = self.alpha / ((2.0 - self.alpha) * self.every)

        def se(p: np.ndarray) -> np.ndarray:
            return np.sqrt(np.clip(p * (1.0 - p), 1e-6, None) * noise)

        hs = smallest(ema_hot, m)
        cs = smallest(-ema_cold, m)
        p_in = np.clip(ema_cold[cs] - self.margin * se(ema_cold[cs]), 0.0, 1.0)
        p_out = np.clip(ema_hot[hs] + self.margin * se(ema_hot[hs]), 0.0, 1.0)
        ok = p_in > p_out * (1 + self.hysteresis) + 1e-12
        n_ok = int(np.argmin(ok)) if not ok.all() else m
        if n_ok == 0:
            return none, none
        hs, cs, p_in, p_out = hs[:n_ok], cs[:n_ok], p_in[:n_ok], p_out[:n_ok]
        gpu_t = float(cm.gpu_neuron_s(ema_hot).sum())
        cpu_t = float(cm.cpu_neuron_s(ema_cold).sum())
        gain = np.cumsum(cm.cpu_neuron_s(p_in) - cm.cpu_neuron_s(p_out))
        gpu_after = gpu_t + np.cumsum(cm.gpu_neuron_s(p_in) - cm.gpu_neuron_s(p_out))
        after = np.maximum(gpu_after, cpu_t - gain)
        nb = cm.neuron.total
        per_neuron = 2 * nb / cm.hw.link.pcie_bandwidth + 4 * nb / cm.hw.cpu.bandwidth
        value = self.horizon_tokens * (max(gpu_t, cpu_t) - after) - np.arange(1, n_ok + 1) * per_neuron
        best = int(np.argmax(value))
        if value[best] <= 0:
            return none, none
        return hs[: best + 1].astype(np.int64), cs[: best + 1].astype(np.int64)


def replay_dynamic(rule: DynamicRule, prior: np.ndarray, hot: list[np.ndarray], blocks: np.ndarray,
                   block_tokens: np.ndarray, cm: Any, warmup: int = 0) -> dict[str, Any]:
    """Replay the dynamic mode over `blocks` [NB, L, F] (counts per block, in generation order) starting
    from hot sets `hot` (per layer, neuron ids) and EMA `prior` [L, F]. Each block is scored with the hot
    set in effect when it ran; then folded, then swaps decided. Returns caught/total per layer over all
    blocks and over the blocks that start at or after `warmup` tokens, swaps made, and the final sets."""
    L, Fn = prior.shape
    ema = np.array(prior, dtype=np.float64, copy=True)
    is_hot = np.zeros((L, Fn), bool)
    for l, h in enumerate(hot):
        is_hot[l, h] = True
    caught = np.zeros(L)
    caught_w = np.zeros(L)
    static_w = np.zeros(L)  # the starting sets, kept fixed, over the same blocks
    start = is_hot.copy()
    total = np.zeros(L)
    total_w = np.zeros(L)
    swaps = 0
    seen = 0
    for b in range(blocks.shape[0]):
        c = blocks[b].astype(np.float64)
        got = (c * is_hot).sum(1)
        tot = c.sum(1)
        caught += got
        total += tot
        if seen >= warmup:
            caught_w += got
            static_w += (c * start).sum(1)
            total_w += tot
        n = max(int(block_tokens[b]), 1)
        seen += n
        ema = (1 - rule.alpha) * ema + rule.alpha * (c / n)
        for l in range(L):
            hot_ids = np.flatnonzero(is_hot[l])
            cold_ids = np.flatnonzero(~is_hot[l])
            if len(hot_ids) == 0 or len(cold_ids) == 0:
                continue
            hs, cs = rule.decide(ema[l, hot_ids], ema[l, cold_ids], cm)
            if len(hs):
                is_hot[l, hot_ids[hs]] = False
                is_hot[l, cold_ids[cs]] = True
                swaps += len(hs)
    return {"caught": caught, "total": total, "caught_after_warmup": caught_w, "total_after_warmup": total_w,
            "static_after_warmup": static_w,
            "swaps": swaps, "tokens": seen, "final_hot": [np.flatnonzero(r) for r in is_hot]}


# ---- budgets and the solver ------------------------------------------------------------------------
def placement_at_share(profile: Profile, share: float, policy: str, hardware: Any, *, dtype: str | None = None,
                       ctx_len: int = 2048, phase: str = "decode", time_limit: float = 30.0):
    """The solver's Placement of `profile` at GPU budget "dense tensors + `share` of the FFN bytes" (the
    study's ffn:F budget), with the same dtype and context for the account and the cost model."""
    from hotcold.memory import canonical_dtype, neuron_bytes, placement_bytes
    from hotcold.solver.hardware import HardwareSpec, resolve
    from hotcold.solver.solve import solve

    hw = hardware if isinstance(hardware, HardwareSpec) else (
        resolve(path=hardware) if str(hardware).endswith(".json") or Path(str(hardware)).is_file()
        else resolve(preset_name=str(hardware)))
    cfg = profile.model_config
    dt = canonical_dtype(dtype or hw.dtype)
    acct0 = placement_bytes(cfg, [0] * cfg.n_layers, dt, ctx_len=ctx_len, cold_mode="threshold")
    # share of the FFN bytes, in whole neurons: round(share · all neurons) of them fit exactly
    k = round(share * cfg.n_layers * cfg.n_ff)
    budget = acct0.gpu_total + k * neuron_bytes(cfg, dt).total
    return solve(profile, hw, policy=policy, gpu_budget=budget, cpu_budget=None, dtype=dt, ctx_len=ctx_len,
                 phase=phase, time_limit=time_limit), hw


# ---- the measurement -------------------------------------------------------------------------------
@dataclass(frozen=True)
class HotsetOptions:
    shares: tuple[float, ...] = DEFAULT_SHARES
    phase: str = "decode"  # which of the profile's frequencies rank neurons (and the solver reads)
    hardware: str = "pc-high"  # cost model of the adaptive solver and the dynamic rule
    dtype: str | None = None  # bytes per neuron in the budget / cost model (None: the hardware's)
    ctx_len: int = 2048  # KV cache the budget and cost model are sized for
    warmup: int = 256  # dynamic: also report the share caught after this many continuation tokens
    dynamic: dict[str, Any] = field(default_factory=dict)  # overrides of the runtime's DynamicPlacement defaults
    time_limit: float = 30.0  # solver

    def validate(self) -> None:
        if not self.shares or not all(0.0 < s < 1.0 for s in self.shares):
            raise InputError(f"GPU shares must be fractions in (0, 1), got {list(self.shares)}",
                             "pass e.g. --shares 0.05,0.1,0.2,0.3,0.4,0.5,0.6")
        if self.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {self.warmup}", "pass e.g. 256")


def _check_pair(profile: Profile, ev: Profile) -> None:
    if profile.fingerprint != ev.fingerprint:
        raise IncompatibleError(f"the evaluation profile {ev.path or '?'} is of another model "
                                f"({ev.manifest['model'].get('source')}) than {profile.path or 'the profile'} "
                                f"({profile.manifest['model'].get('source')})", "profile the same model")
    if kind_of(profile.manifest["activation"]) != kind_of(ev.manifest["activation"]):
        raise IncompatibleError(f"the evaluation profile counts {ev.manifest['activation'].get('kind')} "
                                f"activations, the profile {profile.manifest['activation'].get('kind')}",
                                "profile both with the same --activation (and --thresholds-from the profile)")
    if not ev.sequences:
        raise InputError(f"the evaluation profile {ev.path or '?'} has no per-sequence records",
                         "make it with `hotcold profile run --per-sequence ...` (or pass a dataset to --eval)")


def _top_by(keys: np.ndarray) -> np.ndarray:
    """Neuron ids by descending key along the last axis (stable)."""
    return np.argsort(-keys, axis=-1, kind="stable")


def _cum_in_order(counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Cumulative counts [.., F + 1] of `counts` [.., F] taken in `order` (a leading 0)."""
    c = np.take_along_axis(counts.astype(np.int64), order, axis=-1).cumsum(-1)
    return np.concatenate([np.zeros((*c.shape[:-1], 1), np.int64), c], axis=-1)


def measure_hotsets(profile: Profile, ev: Profile, opts: HotsetOptions | None = None,
                    log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The hot-set table (module docstring) as a JSON-able dict: `overall[choice][i]` and
    `layers[choice][i]` (per layer) for share opts.shares[i], plus what each choice held."""
    from hotcold.solver.costmodel import CostModel

    opts = opts or HotsetOptions()
    opts.validate()
    _check_pair(profile, ev)
    L, Fn = profile.n_layers, profile.n_ff
    f = profile.frequencies(opts.phase)
    seqs = ev.sequences
    per_seq = decode_counts(seqs)  # [S, L, F]
    work = per_seq.sum(0, dtype=np.int64)  # [L, F]
    total_l = work.sum(1).astype(np.float64)  # [L]
    if total_l.sum() == 0:
        raise InputError(f"the evaluation profile {ev.path or '?'} has no continuation activations",
                         "evaluate on a workload with continuations (teacher-forced or generate mode)")
    log(f"{per_seq.shape[0]} evaluation sequences, {int(seqs['tokens'][:, 1].sum())} continuation tokens")

    prof_order = _top_by(f)  # [L, F]
    cum_prof = _cum_in_order(work, prof_order)  # [L, F + 1]
    cum_work = _cum_in_order(work, _top_by(work.astype(np.float64)))
    # per sequence: the prompt's own order (ties by the profile's frequency) and the continuation's own
    tie = 0.5 * f / max(float(f.max()), 1e-12)
    pre_order = _top_by(seqs["prefill"].astype(np.float64) + tie[None])
    cum_pre = _cum_in_order(per_seq, pre_order)  # [S, L, F + 1]
    prompt_moved = [_moved_per_sequence(pre_order, prof_order, int(round(s * Fn))) for s in opts.shares]
    del pre_order
    cum_own = _cum_in_order(per_seq, _top_by(per_seq.astype(np.float64)))
    rule, rule_src = DynamicRule.from_runtime(**opts.dynamic)
    block = int((ev.manifest.get("sequences") or {}).get("block") or 0)
    if block and block != rule.every:
        log(f"dynamic: the evaluation's blocks hold {block} tokens, so the replay folds every {block} tokens "
            f"(the runtime's default is {rule.every})")
        rule = DynamicRule(**{**asdict(rule), "every": block})

    overall: dict[str, list[float]] = {c: [] for c in CHOICES}
    layers: dict[str, list[list[float]]] = {c: [] for c in CHOICES}
    held: dict[str, list[float]] = {c: [] for c in CHOICES}
    n_hot_of: dict[str, list[list[int]]] = {"fixed": [], "adaptive": []}
    dyn_info: list[dict[str, Any]] = []
    solver_info: dict[str, list[dict[str, Any]]] = {"fixed": [], "adaptive": []}
    cm = None
    for s in opts.shares:
        k = int(round(s * Fn))
        res: dict[str, np.ndarray] = {}
        res["profile"] = cum_prof[:, k]
        held["profile"].append(k * L / (L * Fn))
        for pol in ("fixed", "adaptive"):
            pl, hw = placement_at_share(profile, s, pol, opts.hardware, dtype=opts.dtype, ctx_len=opts.ctx_len,
                                        phase=opts.phase, time_limit=opts.time_limit)
            n_hot = np.asarray(pl.n_hot, np.int64)
            order = np.asarray(pl.order, np.int64)
            res[pol] = _cum_in_order(work, order)[np.arange(L), n_hot]
            held[pol].append(float(n_hot.sum()) / (L * Fn))
            n_hot_of[pol].append(n_hot.tolist())
            sv = pl.manifest["solver"]
            solver_info[pol].append({"share": s, "status": sv.get("status"), "gap": sv.get("gap"),
                                     "seconds": sv.get("seconds"),
                                     "modelled_ms_per_token": pl.manifest["totals"]["modelled_ms_per_token"]})
            if pol == "fixed":
                fixed_hot = [order[l, :n_hot[l]] for l in range(L)]
                if cm is None:
                    cm = CostModel(profile.model_config, hw, pl.manifest["dtype"], cold_mode="threshold",
                                   ctx_len=opts.ctx_len)
        log(f"share {s:.0%}: solved fixed and adaptive; replaying the dynamic mode")
        dyn = replay_dynamic(rule, f, fixed_hot, seqs["blocks"], seqs["block_tokens"], cm, warmup=opts.warmup)
        res["dynamic"] = dyn["caught"]
        held["dynamic"].append(held["fixed"][-1])
        tw = dyn["total_after_warmup"]
        dyn_info.append({"share": s, "swaps": dyn["swaps"], "tokens": dyn["tokens"],
                         "after_warmup": float(dyn["caught_after_warmup"].sum() / tw.sum()) if tw.sum() else None,
                         "fixed_after_warmup": float(dyn["static_after_warmup"].sum() / tw.sum()) if tw.sum() else None})
        res["prompt"] = cum_pre[:, :, k].sum(0)
        res["oracle"] = cum_own[:, :, k].sum(0)
        res["oracle-workload"] = cum_work[:, k]
        for c in ("prompt", "oracle", "oracle-workload"):
            held[c].append(k / Fn)
        res["random"] = total_l * (k / Fn)
        held["random"].append(k / Fn)
        for c in CHOICES:
            v = np.asarray(res[c], np.float64)
            overall[c].append(float(v.sum() / total_l.sum()))
            layers[c].append([float(x) for x in v / np.maximum(total_l, 1)])
    return {
        "kind": "hotsets", "format_version": 1,
        "model": {"source": profile.manifest["model"].get("source"), "fingerprint": profile.fingerprint,
                  "n_layers": L, "n_ff": Fn},
        "profile": _describe(profile), "eval": _describe(ev),
        "options": {**asdict(opts), "shares": list(opts.shares), "dynamic": asdict(rule),
                    "dynamic_defaults_from": str(Path(rule_src).relative_to(Path(rule_src).parents[2]))},
        "shares": list(opts.shares), "choices": list(CHOICES),
        "continuation_tokens": int(seqs["tokens"][:, 1].sum()), "sequences": int(per_seq.shape[0]),
        "activations_per_layer": total_l.tolist(),
        "overall": overall, "layers": layers, "held": held, "n_hot": n_hot_of,
        "solver": solver_info, "dynamic": dyn_info,
        # "prompt" re-chosen after each prefill: neurons that enter the GPU per sequence (the first sequence
        # from the profile's top set), as a fraction of all L x n_ff neurons, per share
        "prompt_moved_per_sequence": prompt_moved,
    }


def _moved_per_sequence(pre_order: np.ndarray, prof_order: np.ndarray, k: int) -> float:
    """Mean over sequences of the neurons in sequence s's top-k set (per layer) that were not in sequence
    s - 1's (the profile's for s = 0), over all L x F neurons: what a per-prompt placement copies in."""
    S, L, F = pre_order.shape
    if k <= 0 or k >= F:
        return 0.0
    prev = np.zeros((L, F), bool)
    np.put_along_axis(prev, prof_order[:, :k], True, axis=1)
    moved = 0
    for s in range(S):
        cur = np.zeros((L, F), bool)
        np.put_along_axis(cur, pre_order[s][:, :k], True, axis=1)
        moved += int((cur & ~prev).sum())
        prev = cur
    return moved / (S * L * F)


def _describe(p: Profile) -> dict[str, Any]:
    m = p.manifest
    act = m.get("activation") or {}
    ds = {k: v for k, v in (m.get("dataset") or {}).items() if k != "ids"}
    return {"path": str(p.path) if p.path else None, "content_hash": p.content_hash, "dataset": ds,
            "mode": m.get("mode"), "token_count": m.get("token_count"),
            "activation": {"kind": act.get("kind"), "target_sparsity": act.get("target_sparsity"),
                           "thresholds": act.get("thresholds")}}


# ---- the report ------------------------------------------------------------------------------------
LABELS = {"profile": "profile top (per layer)", "fixed": "fixed (solver)", "adaptive": "adaptive (solver)",
          "dynamic": "dynamic (EMA replay)", "prompt": "prompt's own top", "oracle": "oracle (per sequence)",
          "oracle-workload": "oracle (workload)", "random": "random"}


def report_markdown(r: dict[str, Any], plots: Sequence[str] = (), layer_share: float | None = None) -> str:
    shares = r["shares"]
    ev, pr = r["eval"], r["profile"]

    def where(d: dict[str, Any]) -> str:
        ds = d["dataset"]
        s = str(ds.get("spec") or ds.get("name") or "?")
        if ds.get("split"):
            s += f" {ds['split']}"
        return f"{s} ({ds.get('n_prompts')} prompts, {d['mode']})"

    act = pr["activation"]
    sp = act.get("target_sparsity")
    lines = [f"# Hot sets: {r['model']['source']}", "",
             f"Profile: {where(pr)}; evaluation: {where(ev)}, {r['sequences']} sequences, "
             f"{r['continuation_tokens']} continuation tokens scored. Activation: {act['kind']}"
             + (f" at target sparsity {sp:.0%}" if sp is not None else "") + ".", "",
             "Share of the evaluation continuation's activations that land on the GPU, by GPU share of neurons:", ""]
    head = "| choice | " + " | ".join(f"{s:.0%}" for s in shares) + " |"
    lines += [head, "|---|" + "---:|" * len(shares)]
    for c in r["choices"]:
        cells = []
        for i, v in enumerate(r["overall"][c]):
            h = r["held"][c][i]
            note = f" ({h:.0%} held)" if c in ("fixed", "adaptive") and abs(h - shares[i]) > 0.005 else ""
            cells.append(f"{v:.1%}{note}")
        lines.append(f"| {LABELS.get(c, c)} | " + " | ".join(cells) + " |")
    dyn = r.get("dynamic") or []
    if dyn:
        w = r["options"]["warmup"]
        lines += ["", f"Dynamic replay ({r['options']['dynamic']['every']}-token blocks, alpha "
                  f"{r['options']['dynamic']['alpha']}): swaps made, and the share caught after the first {w} "
                  "continuation tokens (dynamic vs its fixed starting set over the same tokens): "
                  + "; ".join(f"{d['share']:.0%}: {d['swaps']} swaps, "
                              + ("n/a" if d["after_warmup"] is None else
                                 f"{d['after_warmup']:.1%} vs {d['fixed_after_warmup']:.1%}") for d in dyn) + "."]
    j = _nearest(shares, layer_share if layer_share is not None else 0.2)
    Fn = r["model"]["n_ff"]
    lines += ["", f"Per layer at a {shares[j]:.0%} GPU share (fixed and adaptive hold their own share of each "
              "layer, in the last two columns):", "",
              "| layer | " + " | ".join(LABELS.get(c, c) for c in r["choices"]) + " | fixed held | adaptive held |",
              "|---:|" + "---:|" * (len(r["choices"]) + 2)]
    for l in range(r["model"]["n_layers"]):
        lines.append(f"| {l} | " + " | ".join(f"{r['layers'][c][j][l]:.1%}" for c in r["choices"])
                     + f" | {r['n_hot']['fixed'][j][l] / Fn:.0%} | {r['n_hot']['adaptive'][j][l] / Fn:.0%} |")
    for p in plots:
        lines += ["", f"![{Path(p).stem}]({Path(p).name})"]
    return "\n".join(lines) + "\n"


def _nearest(shares: Sequence[float], s: float) -> int:
    return int(np.argmin([abs(x - s) for x in shares]))


def plot_hotsets(r: dict[str, Any], path: str | Path, layer_share: float | None = None) -> Path:
    """Left: overall share caught vs GPU share per choice; right: per layer at one share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = r["shares"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"random": dict(color="grey", ls=":"), "oracle": dict(color="black", ls="--"),
              "oracle-workload": dict(color="dimgrey", ls="-."), "prompt": dict(color="tab:purple"),
              "profile": dict(color="tab:blue"), "fixed": dict(color="tab:cyan", marker="s", ms=3),
              "adaptive": dict(color="tab:orange", marker="o", ms=3), "dynamic": dict(color="tab:green", marker="^", ms=3)}
    x = [100 * s for s in shares]
    for c in r["choices"]:
        ax.plot(x, [100 * v for v in r["overall"][c]], label=LABELS.get(c, c), **styles.get(c, {}))
    ax.set_xlabel("GPU share of FFN neurons (%)")
    ax.set_ylabel("share of held-out activations on the GPU (%)")
    ax.set_xlim(0, 100 * max(shares) * 1.05)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    j = _nearest(shares, layer_share if layer_share is not None else 0.2)
    Lr = np.arange(r["model"]["n_layers"])
    for c in r["choices"]:
        ax2.plot(Lr, [100 * v for v in r["layers"][c][j]], label=LABELS.get(c, c), **styles.get(c, {}))
    ax2.set_xlabel("layer")
    ax2.set_ylabel(f"share caught at {shares[j]:.0%} GPU (%)")
    ax2.grid(alpha=0.3)
    sp = r["profile"]["activation"].get("target_sparsity")
    fig.suptitle(f"{r['model']['source']}: profile {r['profile']['dataset'].get('split') or ''} -> eval "
                 f"{r['eval']['dataset'].get('spec') or r['eval']['dataset'].get('name')} "
                 f"{r['eval']['dataset'].get('split') or ''}"
                 + (f", sparsity {sp:.0%}" if sp is not None else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(r: dict[str, Any], out: str | Path, layer_share: float | None = None) -> Path:
    """out/hotsets.json, out/hotsets.png, out/report.md, written to a temp dir and renamed into place."""
    from hotcold.artifacts import atomic_dir

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "hotsets.json").write_text(json.dumps(r, indent=1, default=_json) + "\n")
        png = plot_hotsets(r, tmp / "hotsets.png", layer_share)
        (tmp / "report.md").write_text(report_markdown(r, [str(png)], layer_share))
    return out


def _json(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(type(o).__name__)
