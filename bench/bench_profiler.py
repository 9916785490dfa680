"""Profiler overhead over plain generation on SmolLM2, and the synthetic 70B profile's time, in one run.

    python bench/bench_profiler.py [--model smollm2-135m] [--dataset mbpp] [--split test] [--limit 100]
                                   [--max-new-tokens 64] [--threads 2] [--out bench/results/profiler.json]

The profiled side is the real `run_profile` (generate mode, default activation: magnitude with per-layer
thresholds calibrated for 50% sparsity), with the already loaded model. After each prompt it finishes,
its progress callback generates the same prompt again without the profiler (plain greedy decoding of the
same length), so plain and profiled runs interleave prompt by prompt and a load change on this shared
machine hits both alike; the plain time spent inside the callback is subtracted from the profiler's.

Reported: plain seconds, profiled seconds (counting pass) and the calibration pass separately, the
overhead of the counting pass (the per-token cost of profiling) and the overhead including calibration.
Both runs must produce identical tokens (the profiler observes, never changes, the forward pass).
Warm-up (one prompt each way) excluded. Also: the time to build and write an 80 x 28672 synthetic profile.

On a shared machine run it with OMP_WAIT_POLICY=PASSIVE: with other processes on the cores, OpenMP
threads that spin-wait slow 2-thread decoding down by an order of magnitude (recorded under machine.env).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="mbpp")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--calibration-prompts", type=int, default=None, help="default: the profiler's default")
    ap.add_argument("--threshold", type=float, default=None, help="absolute threshold (no calibration pass)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synth-shape", default="llama-70b")
    ap.add_argument("--out", default="bench/results/profiler.json")
    a = ap.parse_args()

    from hotcold.model.dense import DenseModel
    from hotcold.model.generate import generate
    from hotcold.model.registry import load_source
    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.engine import ProfileOptions, run_profile
    from hotcold.profiler.sequences import encode_tasks, tokenizer_for
    from hotcold.workloads import load_dataset

    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    src = load_source(a.model)
    model = DenseModel.from_source(src)
    load_s = time.perf_counter() - t0
    tok = tokenizer_for(src)
    ds = load_dataset(a.dataset, a.split, limit=a.limit)
    seqs = encode_tasks(ds.tasks, tok, "generate")
    by_id = {s.id: s for s in seqs}
    order = [s.id for s in seqs]
    n = a.max_new_tokens

    # warm-up, excluded
    generate(model, list(seqs[0].prompt), 4, eos_ids=tok.eos_ids)
    run_profile(src, [seqs[0]], ProfileOptions(max_new_tokens=4, activation=ActivationSpec(threshold=0.1)), model=model)

    plain = {"s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0, "ids": {}}
    in_callback = [0.0]

    def after_prompt(done: float, total: int, tokens: int) -> None:
        i = int(done)
        if i < 1 or order[i - 1] in plain["ids"]:
            return
        c0 = time.perf_counter()
        s = by_id[order[i - 1]]
        g = generate(model, list(s.prompt), n, eos_ids=tok.eos_ids)
        c1 = time.perf_counter()
        plain["s"] += c1 - c0
        plain["prefill_s"] += g.prefill_seconds
        plain["decode_s"] += g.decode_seconds
        plain["decode_tokens"] += max(len(g.new_ids) - 1, 0)
        plain["ids"][s.id] = g.new_ids
        in_callback[0] += time.perf_counter() - c0
        if i % 10 == 0:
            print(f"  {i}/{total} prompts", file=sys.stderr, flush=True)

    spec = ActivationSpec(threshold=a.threshold) if a.threshold is not None else ActivationSpec()
    kw = {} if a.calibration_prompts is None else {"calibration_prompts": a.calibration_prompts}
    opts = ProfileOptions(mode="generate", max_new_tokens=n, activation=spec, keep_tokens=True, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_profile(src, seqs, opts, out=Path(tmp) / "prof", progress=after_prompt, model=model)
        wall = time.perf_counter() - t0
    profiled_s = wall - in_callback[0]
    counting_s = profiled_s - res.calibration_s
    same = all(res.generated[i] == plain["ids"][i] for i in order)
    tc = res.profile.token_count

    from hotcold.model.config import shape
    from hotcold.profiler.synth import synth_profile

    with tempfile.TemporaryDirectory() as tmp:
        s0 = time.perf_counter()
        synth_profile(shape(a.synth_shape)).save(Path(tmp) / "synth")
        synth_s = time.perf_counter() - s0

    result = {
        "bench": "profiler",
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": a.threads,
                    "torch": torch.__version__, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                    "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ}},
        "model": src.description, "dataset": f"{a.dataset} {a.split}", "prompts": len(seqs), "max_new_tokens": n,
        "activation": res.profile.manifest["activation"]["kind"],
        "calibration_prompts": (res.profile.manifest.get("calibration") or {}).get("prompts"),
        "tokens": {"prefill": tc["prefill"], "decode": tc["decode"]},
        "model_load_s": round(load_s, 2),
        "plain_generation_s": round(plain["s"], 2),
        "plain_decode_tokens_per_s": round(plain["decode_tokens"] / plain["decode_s"], 2) if plain["decode_s"] else None,
        "profile_counting_s": round(counting_s, 2),
        "profile_calibration_s": round(res.calibration_s, 2),
        "profile_total_s": round(profiled_s, 2),
        "overhead_counting": round(counting_s / plain["s"] - 1, 4),
        "overhead_total_incl_calibration": round(profiled_s / plain["s"] - 1, 4),
        "identical_tokens": same,
        "synth": {"shape": a.synth_shape, "seconds": round(synth_s, 2), "layers": shape(a.synth_shape).n_layers,
                  "n_ff": shape(a.synth_shape).n_ff},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    if not same:
        sys.exit("profiled and plain generation produced different tokens")


if __name__ == "__main__":
    main()
