"""The hot-set truth on a real model: how skewed are its FFN firing frequencies, and how much of a held-out
workload's activations does each way of choosing the GPU's neurons catch (`hotcold profile hotsets`).

    python bench/bench_hotsets.py --model qwen2.5-coder-0.5b [--train-limit 64] [--eval-limit 100]
        [--humaneval-limit 64] [--sparsity 0.5] [--dtype bfloat16] [--batch-size 8]
        [--out bench/results/hotsets_qwen2.5-coder-0.5b_s0.5.json] [--docs docs/hotsets]

Steps (each profile is cached in --work and reused while present, so an interrupted run resumes):
  1. profile MBPP train[:train-limit], teacher-forced (prompt + reference code), --per-sequence, magnitude
     rule |silu(g)·u| > t_l with t_l calibrated per layer for --sparsity on its first 16 prompts;
  2. evaluation profiles with the *train* profile's thresholds (the runtime's t_l come from that profile):
     MBPP test[:eval-limit] and, when the HumanEval loader is available, HumanEval[:humaneval-limit]
     (canonical solutions as the continuation), both per-sequence;
  3. hotcold.profiler.hotsets.measure_hotsets for each evaluation, and the skew figures of `profile show`
     (coverage curve, Gini, stability across halves of the train prompts and against each evaluation).
Writes the JSON (with the command), and with --docs a report directory per evaluation (report.md + PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchkit import REPO, log  # bench/ is on sys.path when a script here runs


def profile_cached(src, ds, opts, out: Path, what: str):
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.engine import run_profile

    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        last = [0.0]

        def progress(done: float, total: int, tokens: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 60 or done == total:
                last[0] = now
                log(f"  {what}: {done:.0f}/{total} prompts, {tokens} tokens, {now - t0:.0f} s")

        log(f"profiling {what} -> {out}")
        run_profile(src, ds, opts, out=out, progress=progress)
    return Profile.load(out, with_sequences=True)


def humaneval(limit: int | None):
    """HumanEval through hotcold's loader when it has one (issue 14, part A); None otherwise."""
    from hotcold.errors import HotcoldError
    from hotcold.workloads import load_dataset

    try:
        return load_dataset("humaneval", None, limit=limit)
    except HotcoldError as e:
        log(f"HumanEval not available ({e}); skipped")
        return None


def skew(train, evals: dict) -> dict:
    from hotcold.profiler.stats import summary

    s = summary(train, "decode")
    out = {"coverage": s["coverage"], "gini_range": s["gini_range"], "mean_sparsity": s["mean_sparsity"],
           "cover80_fraction": s["cover_fraction"],
           "layers": [{k: r[k] for k in ("layer", "active", "gini", "coverage", "cover_fraction",
                                         "min_frequency", "max_frequency")} for r in s["layers"]],
           "halves": s["stability"]["halves"], "against": {}}
    for name, ev in evals.items():
        out["against"][name] = summary(train, "decode", against=ev)["stability"]["against"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--train-limit", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--humaneval-limit", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the profiling forward passes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1024, help="(x, mask) samples kept in the train profile")
    ap.add_argument("--hardware", default="pc-high")
    ap.add_argument("--work", default=str(REPO / "bench" / ".cache" / "hotsets"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--docs", default=None, help="write a report directory per evaluation under this folder")
    args = ap.parse_args()

    from hotcold.model.registry import load_source
    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.engine import ProfileOptions
    from hotcold.profiler.hotsets import HotsetOptions, measure_hotsets, plot_hotsets, report_markdown
    from hotcold.workloads import load_dataset

    t_start = time.perf_counter()
    tag = f"{args.model}_s{args.sparsity}"
    out = Path(args.out or REPO / "bench" / "results" / f"hotsets_{tag}.json")
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(args.model)
    base = dict(mode="teacher-forced", batch_size=args.batch_size, dtype=args.dtype, per_sequence=True)
    # the train profile also keeps --samples (x, mask) pairs: the quality grid calibrates the gate rule on them
    train = profile_cached(src, load_dataset("mbpp", "train", limit=args.train_limit),
                           ProfileOptions(activation=ActivationSpec("product", sparsity=args.sparsity),
                                          samples=args.samples, **base),
                           work / f"train{args.train_limit}", f"MBPP train[:{args.train_limit}]")
    spec = ActivationSpec("product", thresholds=tuple(train.manifest["activation"]["thresholds"]))
    evals = {"mbpp-test": profile_cached(src, load_dataset("mbpp", "test", limit=args.eval_limit),
                                         ProfileOptions(activation=spec, **base), work / f"test{args.eval_limit}",
                                         f"MBPP test[:{args.eval_limit}]")}
    he = humaneval(args.humaneval_limit)
    if he is not None:
        evals["humaneval"] = profile_cached(src, he, ProfileOptions(activation=spec, **base),
                                            work / f"humaneval{args.humaneval_limit}",
                                            f"HumanEval[:{args.humaneval_limit}]")
    results = {}
    for name, ev in evals.items():
        log(f"hot sets: MBPP train -> {name}")
        r = measure_hotsets(train, ev, HotsetOptions(hardware=args.hardware), log=log)
        results[name] = r
        if args.docs:
            d = Path(args.docs)
            d.mkdir(parents=True, exist_ok=True)
            png = plot_hotsets(r, d / f"{tag}_{name}.png")
            (d / f"{tag}_{name}.md").write_text(report_markdown(r, [str(png)]))
        log("  " + ", ".join(f"{c} {r['overall'][c][r['shares'].index(0.2)]:.1%}" for c in r["choices"])
            + " at 20% GPU")
    result = {"command": " ".join([sys.executable, *sys.argv]), "settings": vars(args),
              "compute": f"{args.dtype} forward passes on the CPU (hotcold's dense model on the GGUF's dequantized weights)",
              "thresholds": train.manifest["activation"], "skew": skew(train, evals),
              "hotsets": results, "seconds": round(time.perf_counter() - t_start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
