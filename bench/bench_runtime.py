"""Hybrid runtime vs the dense reference on SmolLM2 (CPU), ratios from one run; export time.

    python bench/bench_runtime.py [--model smollm2-135m] [--work bench/.cache/runtime] [--sparsity 0.5]
                                  [--new-tokens 32] [--repeats 3] [--cli-repeats 6] [--out bench/results/runtime.json]

What it does, all in one process (plus subprocesses for the CLI comparison), interleaving the contenders so
that the machine's load (other jobs share its 2 cores) hits all of them alike:
  1. profile MBPP train prompts (teacher-forced, once; kept in --work) for the 50%-sparsity thresholds;
  2. `hotcold export` as a subprocess, timed end to end (imports, GGUF read and dequantisation, writing,
     hashing), for an all-on-CPU placement and a half-hot one, in the bundled and split CPU layouts;
  3. decode speed of the dense reference (fp32, gemv layout: what `hotcold generate` runs) and of each
     bundle in `threshold` mode (50% per-layer sparsity, product rule) and in `exact` mode, decoding in
     lockstep: the contenders take turns token by token, so the machine's load bursts hit all alike;
     per-token times, medians, and the median of per-step paired ratios (warm-up excluded);
  4. `hotcold run --json` (the all-on-CPU split-layout bundle, threshold mode) vs `hotcold generate --json`
     as subprocesses, interleaved, alternating which goes first (decode tokens/s as each reports it).
Writes one JSON object with the command, the machine, and every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchkit import REPO, log, train_profile  # bench/ is on sys.path when a script here runs


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def hotcold(*args: str, timeout: int = 1800) -> tuple[dict, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "hotcold", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"hotcold {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    out = r.stdout
    return (json.loads(out[out.index("{"):]) if "{" in out else {}), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=str(REPO / "bench" / ".cache" / "runtime"))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--profile-prompts", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cli-repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "runtime.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hotcold.model.dense import DenseModel
    from hotcold.model.generate import generate
    from hotcold.model.registry import load_source
    from hotcold.runtime import load
    from hotcold.solver.placement import Placement
    from hotcold.workloads import format_prompt, load_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": " ".join([sys.executable, *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads(), "loadavg_start": loadavg()},
                    "settings": vars(args)}
    src = load_source(args.model)
    cfg = src.config

    # ---- 1. profile (thresholds) --------------------------------------------------------------
    prof, order = train_profile(src, work, args.profile_prompts)

    # ---- 2. export, timed as the CLI -------------------------------------------------------------
    bundles: dict[str, Path] = {}
    result["export"] = []
    for pname, k in (("all-cpu", 0), ("half-hot", cfg.n_ff // 2)):
        pl_dir = work / f"placement-{pname}"
        Placement(manifest={"model": {"config": cfg.to_json(), "fingerprint": src.fingerprint}},
                  order=order, n_hot=np.full(cfg.n_layers, k, np.int32)).save(pl_dir)
        for layout in ("bundled", "split"):
            name = f"{pname}/{layout}"
            out = work / f"bundle-{pname}-{layout}"
            info, dt = hotcold("export", "-m", args.model, "--placement", str(pl_dir), "--profile", str(prof.path),
                               "--sparsity", str(args.sparsity), "--cpu-layout", layout, "-o", str(out), "--json")
            log(f"export {name}: {dt:.1f} s wall (command), {info['seconds']:.1f} s in export_bundle")
            result["export"].append({"bundle": name, "command_seconds": dt, "export_seconds": info["seconds"],
                                     "bytes": sum(info["files"].values()), "loadavg": loadavg()})
            bundles[name] = out

    # ---- 3. in-process decode speed, in lockstep ----------------------------------------------------
    # Every contender decodes its own greedy continuation one token at a time, and the contenders take
    # turns token by token (rotating who goes first), so a burst of load from the machine's other users
    # (it swings speed by 10x within seconds here) falls on all of them alike. Per-token times are kept;
    # medians and per-step paired ratios are reported.
    tok = src.tokenizer()
    tasks = load_dataset("mbpp", "test", limit=args.prompts).tasks
    prompts = [tok.encode(format_prompt(t, "chat", tok.render_chat)) for t in tasks]
    max_len = max(len(p) for p in prompts) + args.new_tokens + 8
    dense = DenseModel.from_source(src, max_len=max_len)
    contenders = {"dense": dense}
    for name, path in bundles.items():
        contenders[f"{name}/threshold"] = load(path, mode="threshold", max_len=max_len, device="cpu")
    contenders["all-cpu/bundled/exact"] = load(bundles["all-cpu/bundled"], mode="exact", max_len=max_len, device="cpu")
    names = list(contenders)
    for m in contenders.values():  # warm-up (numba compiles the cold kernels on first use)
        m.generate(prompts[0][:16], 4) if hasattr(m, "step") else generate(m, prompts[0][:16], 4)
    step_s: dict[str, list[float]] = {k: [] for k in names}
    for m in contenders.values():
        if hasattr(m, "reset_stats"):
            m.reset_stats()

    def first(m, ids):  # prefill: the dense model's forward, or the runtime's own batched prefill
        if hasattr(m, "step"):
            return None, int(m.prefill(ids).argmax())
        cache = m.new_cache(1, len(ids) + args.new_tokens + 1)
        return cache, int(m.forward(torch.tensor([ids]), 0, cache, last_only=True)[0, -1].argmax())

    def next_token(m, cache, pos, t):  # one decode step: the runtime's step() is what `hotcold run` runs
        if hasattr(m, "step"):
            m.step(t)
            return int(m.logits.argmax())
        return int(m.forward(torch.tensor([[t]]), pos, cache, last_only=True)[0, -1].argmax())

    with torch.inference_mode():
        for rep in range(args.repeats):
            for pi, ids in enumerate(prompts):
                state = {k: list(first(m, ids)) for k, m in contenders.items()}
                for step in range(args.new_tokens):
                    shift = step % len(names)
                    for k in names[shift:] + names[:shift]:
                        cache, t = state[k]
                        t0 = time.perf_counter()
                        nxt = next_token(contenders[k], cache, len(ids) + step, t)
                        step_s[k].append(time.perf_counter() - t0)
                        state[k][1] = nxt
                log(f"repeat {rep} prompt {pi}: median ms/token " +
                    ", ".join(f"{k} {1e3 * statistics.median(v):.1f}" for k, v in step_s.items()))
    dense_s = step_s["dense"]
    result["decode"] = {}
    for name, v in step_s.items():
        paired = [b / a for a, b in zip(v, dense_s)]  # dense time / contender time, same step
        result["decode"][name] = {
            "tokens": len(v), "ms_per_token_median": 1e3 * statistics.median(v),
            "tokens_per_s_from_median": 1.0 / statistics.median(v), "tokens_per_s_mean": len(v) / sum(v),
            "speed_ratio_vs_dense_of_medians": statistics.median(dense_s) / statistics.median(v),
            "speed_ratio_vs_dense_paired_median": statistics.median(paired),
            "speed_ratio_vs_dense_of_totals": sum(dense_s) / sum(v)}
    reports = {}
    for name, m in contenders.items():
        if hasattr(m, "report"):
            r = m.report()
            reports[name] = {"decode": {k: v for k, v in r["decode"].items() if k != "layers"},
                             "layers": r["decode"]["layers"], "memory": r["memory"]}
    result["runtime_reports"] = reports
    result["step_seconds"] = step_s

    # ---- 4. the CLI commands, interleaved --------------------------------------------------------
    prompt_text = tasks[0].text
    cli: dict[str, list[float]] = {"hotcold generate": [], "hotcold run (threshold)": []}
    run_bundle = bundles["all-cpu/split"]  # on a CPU-only machine every neuron is on the CPU
    for rep in range(args.cli_repeats):  # alternate which command goes first
        cmds = {"g": ("generate", "-m", args.model, "-p", prompt_text, "-n", str(args.new_tokens), "--json"),
                "r": ("run", str(run_bundle), "-p", prompt_text, "-n", str(args.new_tokens), "--json")}
        done = {k: hotcold(*cmds[k])[0] for k in (("g", "r") if rep % 2 == 0 else ("r", "g"))}
        g, r = done["g"], done["r"]
        cli["hotcold generate"].append(g["decode_tokens_per_s"])
        cli["hotcold run (threshold)"].append(r["decode_tokens_per_s"])
        log(f"cli repeat {rep}: generate {g['decode_tokens_per_s']:.1f}, run {r['decode_tokens_per_s']:.1f} tok/s")
    ratios = [a / b for a, b in zip(cli["hotcold run (threshold)"], cli["hotcold generate"])]
    result["cli"] = {"bundle": str(run_bundle), "samples": cli, "kernel": r.get("kernel"), "device": r.get("device"),
                     "ratio_median": statistics.median(ratios), "ratios": ratios}
    result["machine"]["loadavg_end"] = loadavg()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: round(v["speed_ratio_vs_dense_paired_median"], 3) for k, v in result["decode"].items()}
    log(f"decode ratio vs dense (median): {summary}; CLI run/generate {result['cli']['ratio_median']:.3f}; "
        f"export {[round(e['command_seconds'], 1) for e in result['export']]} s; wrote {args.out}")


if __name__ == "__main__":
    main()
