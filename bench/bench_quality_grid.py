"""Quality under sparsification: next-token agreement, KL and perplexity on held-out MBPP reference code for
the dense model and hybrid placements at GPU shares x activation sparsities x {fixed, adaptive} x rules.

    python bench/bench_quality_grid.py --model qwen2.5-coder-1.5b [--prompts 8] [--shares 0.3,0.1,0.6]
        [--sparsities 0.3,0.5,0.7] [--policies fixed,adaptive] [--rules product,gate] [--dtype bfloat16]
        [--profile DIR] [--out bench/results/quality_grid_qwen2.5-coder-1.5b.json] [--plot PNG]
        [--modes threshold,predictor --heldout DIR]
    python bench/bench_quality_grid.py --plot-only --out JSON --plot PNG      (redraw from a finished grid)

How each grid point is run, through the runtime's public API only:
  placement  hotcold.profiler.hotsets.placement_at_share: the solver's fixed or adaptive policy at GPU budget
             "dense tensors + share of the FFN bytes" on the MBPP train profile (bench_hotsets.py's, made at
             50% sparsity: its frequencies rank neurons for every sparsity of the grid);
  bundle     hotcold.exporter.export_bundle at --dtype with the rule's CPU layout, written to --work and
             deleted once its sparsities are measured (bundles never enter the repo);
  thresholds product rule |silu(g)·u| > t_l: the profile's decode-phase |a| histograms, inverse CDF at the
             sparsity (as the exporter does); gate rule |silu(g)| > t_l: the exact quantile over the profile's
             sampled FFN inputs through each layer's gate rows (as the exporter does); passed to
             hotcold.runtime.load(..., thresholds=...), so one bundle serves every sparsity;
  run        load(bundle, mode="threshold", prefill="dense"): hot neurons dense, cold ones thresholded; each
             prompt prefilled densely, then the reference code teacher-forced through the decode path
             (forward(tokens, start, cache, sparse=True): every token its own active set);
  dense      the first bundle in mode "exact" (the runtime's dense path, same weights and dtype).
  predictor  with --modes ...,predictor each (share, policy, rule, sparsity) gets its own bundle, exported
             with --predictors at that sparsity (hotcold.exporter.predictors: per-layer low-rank MLPs trained
             on the profile's samples for the threshold rule's active set at target recall 0.9, evaluated on
             --heldout), and is run in mode "predictor" (hot neurons dense, the cold neurons the predictor
             selects computed whole) and, from the same bundle, in mode "threshold"; the point records the
             predictors' held-out recall, precision and selected fraction per layer.
Metrics (hotcold.quality.metrics) over all reference positions of all prompts: argmax agreement with dense,
mean KL(dense || hybrid), perplexity of the reference code. Results are rewritten after every grid point,
and a re-run with the same scoring settings (model, profile, prompts, dtype) keeps the points already in --out
and adds the new ones (resumable; the grid may grow by shares, sparsities, policies or rules).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchkit import REPO, log  # bench/ is on sys.path when a script here runs


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def gate_thresholds(src, prof, sparsities: list[float]) -> dict[float, list[float]]:
    """|silu(g)| thresholds per layer at each sparsity: exact quantiles over the profile's sampled inputs."""
    from hotcold.exporter import thresholds as th

    out: dict[float, list[float]] = {s: [] for s in sparsities}
    for l in range(src.config.n_layers):
        gate = src.get(f"layers.{l}.w_gate", torch.float32)
        m = th.magnitudes("gate", src.config.activation, th.sample_inputs(prof, l), gate)
        for s in sparsities:
            out[s].append(th.quantile(m, s))
    return out


def plot(state: dict, path: Path) -> None:
    """Agreement with dense and mean KL against activation sparsity: one line per (share, policy, rule)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[dict]] = {}
    for p in state["points"]:
        lines.setdefault((p["share"], p["policy"], p["rule"], p.get("mode", "threshold")), []).append(p)
    shares = sorted({k[0] for k in lines})
    colors = dict(zip(shares, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (share, pol, rule, md), pts in sorted(lines.items()):
        pts = sorted(pts, key=lambda p: p["sparsity"])
        xs = [p["sparsity"] for p in pts]
        style = dict(color=colors[share], ls=":" if md == "predictor" else "-" if pol == "fixed" else "--",
                     marker="o" if rule == "product" else "x",
                     label=f"{share:.0%} GPU, {pol}, {rule}" + (", predictor" if md == "predictor" else ""))
        ax1.plot(xs, [p["agreement"] for p in pts], **style)
        ax2.plot(xs, [p["kl_mean"] for p in pts], **style)
    ax1.set(xlabel="activation sparsity of the cold side", ylabel="next-token agreement with dense",
            title="agreement (higher is better)")
    ax2.set(xlabel="activation sparsity of the cold side", ylabel="mean KL(dense || hybrid)", yscale="log",
            title="KL (lower is better)")
    ax2.legend(fontsize=7)
    n = state["dense"]["positions"] if state.get("dense") else 0
    fig.suptitle(f"{state['settings'].get('model', '')}: hot neurons dense, cold thresholded (or predicted); {n} MBPP test "
                 "reference positions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--profile", default=None, help="train profile with samples (default: bench_hotsets.py's)")
    ap.add_argument("--prompts", type=int, default=8, help="MBPP test prompts (reference code teacher-forced)")
    ap.add_argument("--max-code-tokens", type=int, default=160, help="reference tokens scored per prompt, at most")
    ap.add_argument("--shares", default="0.3,0.1,0.6", help="GPU shares of the FFN neurons, in run order")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--policies", default="fixed,adaptive")
    ap.add_argument("--rules", default="product,gate")
    ap.add_argument("--dtype", default="bfloat16", help="bundle dtype (the runtime computes in it)")
    ap.add_argument("--hardware", default="pc-high", help="cost model of the adaptive solver")
    ap.add_argument("--work", default=str(REPO / "bench" / ".cache" / "quality_grid"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG: agreement and KL against sparsity, one line per share/policy/rule")
    ap.add_argument("--plot-only", action="store_true", help="only redraw --plot from the grid already in --out")
    ap.add_argument("--modes", default="threshold", help="threshold and/or predictor (predictor: one bundle per sparsity)")
    ap.add_argument("--heldout", default=None, help="predictor mode: a held-out profile with samples (MBPP validation)")
    args = ap.parse_args()
    if args.plot_only:
        if not (args.out and args.plot and Path(args.out).is_file()):
            sys.exit("--plot-only needs --out (an existing grid JSON) and --plot (the PNG to write)")
        plot(json.loads(Path(args.out).read_text()), Path(args.plot))
        log(f"wrote {args.plot}")
        return

    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.registry import load_source
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.hotsets import placement_at_share
    from hotcold.profiler.sequences import tokenizer_for
    from hotcold.quality.metrics import NLL, compare_logits, nll
    from hotcold.runtime import load
    from hotcold.workloads import load_dataset, teacher_forced

    t_start = time.perf_counter()
    out = Path(args.out or REPO / "bench" / "results" / f"quality_grid_{args.model}.json")
    work = Path(args.work) / args.model
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(args.model)
    cfg = src.config
    prof_dir = Path(args.profile or REPO / "bench" / ".cache" / "hotsets" / f"{args.model}_s0.5" / "train64")
    prof = Profile.load(prof_dir, with_samples=True)
    if prof.fingerprint != src.fingerprint:
        raise SystemExit(f"{prof_dir} is a profile of another model; pass --profile for {args.model}")
    shares, sparsities = floats(args.shares), floats(args.sparsities)
    policies, rules = args.policies.split(","), args.rules.split(",")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "plot", "plot_only")}
    state = {"command": " ".join([sys.executable, *sys.argv]), "settings": settings, "profile": str(prof_dir),
             "dense": None, "points": []}
    grid_keys = ("shares", "sparsities", "policies", "rules")  # what a later run may add to
    if out.is_file():
        old = json.loads(out.read_text())
        same = lambda a, b: {k: v for k, v in a.items() if k not in grid_keys} == \
            {k: v for k, v in b.items() if k not in grid_keys}  # noqa: E731
        if same(old.get("settings", {}), settings):
            state["points"], state["dense"] = old.get("points", []), old.get("dense")
            state["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
            log(f"resuming: {len(state['points'])} grid points already in {out}")
    modes = [m_.strip() for m_ in args.modes.split(",") if m_.strip()]
    if not set(modes) <= {"threshold", "predictor"}:
        raise SystemExit(f"--modes {args.modes!r}: use threshold and/or predictor")
    heldout = Profile.load(args.heldout, with_samples=True) if args.heldout else None
    done = {(p["share"], p["policy"], p["rule"], p["sparsity"], p.get("mode", "threshold")) for p in state["points"]}

    def save() -> None:
        state["seconds"] = round(time.perf_counter() - t_start, 1)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(out)

    tok = tokenizer_for(src)
    seqs = []
    for task in load_dataset("mbpp", "test", limit=args.prompts).tasks:
        p, c = teacher_forced(task, "chat", tok.render_chat)
        seqs.append((task.id, tok.encode(p), tok.encode(c, add_bos=False)[: args.max_code_tokens]))
    n_pos = sum(len(c) for _, _, c in seqs)
    log(f"{len(seqs)} MBPP test prompts, {n_pos} reference positions scored")

    thresholds = {"product": {s: [float(t) for t in prof.magnitude_thresholds(s, "decode")] for s in sparsities}}
    if "gate" in rules:
        thresholds["gate"] = gate_thresholds(src, prof, sparsities)

    def run(m, sparse: bool) -> list[torch.Tensor]:
        """Logits predicting each reference token: dense prefill, then the decode path teacher-forced."""
        res = []
        for _, p, c in seqs:
            cache = m.new_cache(1, len(p) + len(c))
            first = m.forward(torch.tensor([p]), 0, cache, last_only=True)[0]
            rest = m.forward(torch.tensor([c[:-1]]), len(p), cache, sparse=sparse)[0] if len(c) > 1 else first[:0]
            res.append(torch.cat([first, rest]).float())
        return res

    def score(logits: list[torch.Tensor], dense: list[torch.Tensor] | None) -> dict:
        total = NLL(0.0, 0)
        for (_, _, c), lg in zip(seqs, logits):
            total = total + nll(lg, c)
        row = {"positions": total.count, "perplexity": total.perplexity, "nll_mean": total.mean}
        if dense is not None:
            cmp = compare_logits(torch.cat(dense), torch.cat(logits))
            row.update(agreement=cmp.agreement, kl_mean=cmp.kl_mean, kl_max=cmp.kl_max)
        return row

    dense_logits: list[torch.Tensor] | None = None
    per_sparsity = "predictor" in modes  # predictors are trained for one sparsity: a bundle each
    order = [(s, pol, rule) for s in shares for pol in policies for rule in rules]
    for i, (share, pol, rule) in enumerate(order):
        todo = [sp for sp in sparsities if any((share, pol, rule, sp, md) not in done for md in modes)]
        if not todo:
            continue
        t0 = time.perf_counter()
        placement, _ = placement_at_share(prof, share, pol, args.hardware, dtype=args.dtype)
        for sp in todo if per_sparsity else [None]:
            bdir = work / (f"bundle-{pol}-{share}-{rule}" + (f"-s{sp}-pred" if per_sparsity else ""))
            report = None
            if not (bdir / "manifest.json").is_file():
                log(f"[{i + 1}/{len(order)}] export {pol} @ {share:.0%} GPU, {rule} rule"
                    + (f", predictors at sparsity {sp}" if per_sparsity else "") + f" -> {bdir}")
                opts = ExportOptions(dtype=args.dtype, rule=rule, sparsity=sp if per_sparsity else 0.5,
                                     predictors=per_sparsity)
                report = export_bundle(src, placement, bdir, profile=prof, heldout=heldout, options=opts,
                                       log=log).predictor_report
            t_export = time.perf_counter() - t0
            if dense_logits is None:
                m = load(str(bdir), mode="exact", device="cpu", max_len=4096)
                dense_logits = run(m, sparse=False)
                del m
                state["dense"] = {**score(dense_logits, None), "how": f"runtime mode exact on {bdir.name} ({args.dtype})"}
                log(f"dense: perplexity {state['dense']['perplexity']:.3f} over {state['dense']['positions']} positions")
                save()
            for sp_ in [sp] if per_sparsity else todo:
                for md in modes:
                    if (share, pol, rule, sp_, md) in done:
                        continue
                    t1 = time.perf_counter()
                    kw = {"thresholds": thresholds[rule][sp_]} if md == "threshold" else {}
                    m = load(str(bdir), mode=md, prefill="dense", device="cpu", max_len=4096, **kw)
                    row = {"share": share, "policy": pol, "rule": rule, "sparsity": sp_, "mode": md,
                           "hot_fraction": float(placement.n_hot.sum()) / (cfg.n_layers * cfg.n_ff),
                           **score(run(m, sparse=True), dense_logits),
                           "seconds": {"export": round(t_export, 1), "eval": round(time.perf_counter() - t1, 1)}}
                    if md == "predictor" and report:
                        ho = [r["heldout"] for r in report]
                        row["predictors"] = {
                            "layers": [{"layer": r["layer"], "rank": r["rank"], **{k: r["heldout"][k] for k in
                                        ("recall", "precision", "selected_fraction", "active_fraction")}} for r in report],
                            **{f"{k}_median": float(statistics.median(h[k] for h in ho))
                               for k in ("recall", "precision", "selected_fraction", "active_fraction")},
                            "recall_min": float(min(h["recall"] for h in ho)),
                            "heldout_source": report[0].get("heldout_source")}
                    del m
                    state["points"].append(row)
                    done.add((share, pol, rule, sp_, md))
                    save()
                    log(f"{pol} @ {share:.0%} GPU ({row['hot_fraction']:.1%} held), {rule} rule, sparsity {sp_}, {md}: "
                        f"agreement {row['agreement']:.4f}, KL {row['kl_mean']:.4f}, ppl {row['perplexity']:.3f} "
                        f"(dense {state['dense']['perplexity']:.3f})")
            shutil.rmtree(bdir, ignore_errors=True)
    state["thresholds"] = {r: {str(s): v for s, v in d.items()} for r, d in thresholds.items()}
    save()
    log(f"wrote {out}")
    if args.plot:
        plot(state, Path(args.plot))
        log(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
