"""Full 30-layer SmolLM2 predictor export: per-layer recall/precision on held-out MBPP prompts, ONNX vs torch.

    python bench/bench_predictors.py [--model smollm2-135m] [--train 24] [--heldout 8] [--samples 2048]
                                     [--sparsity 0.5] [--out bench/results/predictors.json]

Profiles MBPP train prompts (teacher-forced, with sampled (FFN input, mask) pairs) for training and MBPP
validation prompts (never seen in training) as the held-out set, exports an all-on-CPU bundle with
`--predictors` (the `hotcold export` code path: per-layer rank search, decision threshold set on a
validation part of the training samples for the target recall, ONNX export checked with onnx.checker
and onnxruntime), and writes the per-layer report: rank, held-out recall, precision, selected and active
fractions, and the largest |ONNX - torch| logit difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchkit import REPO, log  # bench/ is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=str(REPO / "bench" / ".cache" / "predictors"))
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--target-recall", type=float, default=0.9)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predictors.json"))
    args = ap.parse_args()

    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.exporter.predictors import PredictorOptions
    from hotcold.model.registry import load_source
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.engine import ProfileOptions, run_profile
    from hotcold.solver.placement import Placement
    from hotcold.workloads import load_dataset

    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(args.model)
    cfg = src.config
    profiles = {}
    for name, split, n, samples in (("train", "train", args.train, args.samples),
                                    ("heldout", "validation", args.heldout, args.samples // 2)):
        d = work / f"profile-{split}{n}-s{samples}"
        if not (d / "manifest.json").is_file():
            log(f"profiling {n} MBPP {split} prompts with {samples} samples -> {d}")
            run_profile(src, load_dataset("mbpp", split, limit=n), ProfileOptions(mode="teacher-forced", samples=samples),
                        out=d)
        profiles[name] = Profile.load(d, with_samples=True)
    order = np.argsort(-profiles["train"].frequencies(), axis=1, kind="stable").astype(np.int32)
    placement = Placement(manifest={"model": {"config": cfg.to_json(), "fingerprint": src.fingerprint}},
                          order=order, n_hot=np.zeros(cfg.n_layers, np.int32))
    log("exporting with predictors (every layer)")
    t0 = time.perf_counter()
    res = export_bundle(src, placement, work / "bundle", profile=profiles["train"], heldout=profiles["heldout"],
                        options=ExportOptions(sparsity=args.sparsity, predictors=True,
                                              predictor=PredictorOptions(target_recall=args.target_recall)),
                        log=log)
    export_s = time.perf_counter() - t0
    layers = [{"layer": r["layer"], "rank": r["rank"], "decision_threshold": r["decision_threshold"],
               **{k: r["heldout"][k] for k in ("recall", "precision", "selected_fraction", "active_fraction")},
               "onnx_max_abs_diff": r["onnx_check"]["max_abs_diff"],
               "onnx_max_abs_logit": r["onnx_check"]["max_abs_logit"]} for r in res.predictor_report]
    rec = [x["recall"] for x in layers]
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "settings": vars(args),
        "heldout_source": res.predictor_report[0].get("heldout_source"),
        "export_seconds": export_s, "total_seconds": time.perf_counter() - t_start,
        "summary": {"layers": len(layers), "recall_min": min(rec), "recall_median": statistics.median(rec),
                    "layers_below_target": [x["layer"] for x in layers if x["recall"] < args.target_recall],
                    "precision_median": statistics.median(x["precision"] for x in layers),
                    "selected_fraction_median": statistics.median(x["selected_fraction"] for x in layers),
                    "onnx_max_abs_diff": max(x["onnx_max_abs_diff"] for x in layers),
                    "onnx_equals_torch_1e-5": all(x["onnx_max_abs_diff"] <= 1e-5 * (1 + x["onnx_max_abs_logit"])
                                                  for x in layers)},
        "layers": layers,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"summary: {result['summary']}; wrote {args.out}")


if __name__ == "__main__":
    main()
