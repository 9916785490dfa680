"""LLaMA-2-70B-shaped at 4 bits, all 80 layers built and run, under a measured GPU memory cap (issue 15).

    # here (CPU machine, needs the Qwen2.5-Coder-1.5B MBPP profiles of bench/bench_hotsets.py):
    PYTHONPATH=. python bench/bench_q70b.py --prepare bench/.cache/q70b

    # on the GPU machine (carry bench/.cache/q70b):
    PYTHONPATH=. python bench/bench_q70b.py --work bench/.cache/q70b --out $OUT

Weights are random quantized bytes generated on the GPU (hotcold.runtime.build.random_quantized_model):
attention, hot rows and the head on the GPU, cold rows in pinned host memory. Nothing is extrapolated:
every layer is built and every token runs through all of them.

Runs (each in its own process, so that the GPU memory it holds is its own: nvidia-smi is sampled while
it runs, the same way ../shared/anchors/llamacpp/run.sh measures llama.cpp):
  swiglu-threshold  SwiGLU-realistic: per-neuron frequencies of Qwen2.5-Coder-1.5B on MBPP (profiled at
                    50% sparsity, the product rule), mapped by relative depth onto 80 x 28672 neurons. Hot
                    set: the most frequent neurons of MBPP train that fit the cap (PowerInfer's fixed
                    policy). Cold side in threshold mode (every cold gate row read, up/down rows of the
                    active ones): each layer's threshold is tuned during warm-up so that its cold active
                    fraction equals the mean MBPP-test frequency of that layer's cold neurons.
  swiglu-predictor  the same hot set, the cold side in predictor mode selecting what SmolLM2's real
                    predictors select at 90% recall (bench/results/predictors.json: 0.77 of neurons at
                    50% density, so frequencies x selected/active), sampled per neuron.
  relu-predictor    ReLU-like: the skewed synthetic power law (what PowerInfer's ReLU models show), rescaled
                    so that cold neurons fire 10% of the time under the fixed hot set; predictor mode.
  all-gpu           budget >= the model: every neuron on the GPU, exact mode (no CPU side).
The cold-side selection in predictor runs is sampled from the frequencies (a low-rank predictor of
--predictor-rank is evaluated for its cost only). Results say all of this in their JSON.

Floors: GPU bytes / this machine's GPU read rate + active cold bytes / its CPU read rate (the plain read
ceiling of hotcold.runtime.calib.read_ceiling), the sides serial. The cost model (hotcold.solver.costmodel)
predicts each run from the kernels' rates measured here beforehand on one layer (not fitted to the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

GiB = 1 << 30
SHAPE = "llama2-70b"


from benchkit import log  # bench/ is on sys.path when a script here runs
from hotcold.bench.harness import save_json as save
from hotcold.study.scale import NvSampler, gpu_used, hot_first, machine_spec, measure_rates


# ---- here: the workloads ------------------------------------------------------------------------
def prepare(work: Path, hotsets: Path, layers: int, seed: int) -> None:
    """Map the real profiles (MBPP train / MBPP test / HumanEval) onto the 70B shape into work/workloads.npz."""
    from hotcold.model.config import shape
    from hotcold.workloads import frequencies as wl

    cfg = shape(SHAPE)
    names = {"train": "train32", "test": "test24", "humaneval": "humaneval16"}
    srcs, infos = [], {}
    for k, d in names.items():
        f, info = wl.load_frequencies(hotsets / d)
        srcs.append(f)
        infos[k] = info
        log(f"{k}: {hotsets / d}: {f.shape}, mean frequency {f.mean():.3f}")
    mapped = wl.map_by_depth(srcs, layers, cfg.n_ff, seed=seed)
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(work / "workloads.npz", **{k: m.astype(np.float16) for k, m in zip(names, mapped)})
    pred = json.loads(Path("bench/results/predictors.json").read_text())["summary"]
    meta = {"profiles": infos, "mapping": "source layers by relative depth, neurons by a shared random map with "
                                          "log-normal jitter 0.25 (hotcold.workloads.frequencies.map_by_depth)",
            "layers": layers, "n_ff": cfg.n_ff, "seed": seed,
            "predictor_selected_over_active": pred["selected_fraction_median"] / 0.5,
            "predictor_source": "bench/results/predictors.json (SmolLM2-135M at 50% sparsity, target recall 0.9): "
                                f"recall {pred['recall_median']:.3f}, precision {pred['precision_median']:.3f}, "
                                f"selected fraction {pred['selected_fraction_median']:.3f}",
            "mean_frequency": {k: float(m.mean()) for k, m in zip(names, mapped)}}
    (work / "workloads.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {work / 'workloads.npz'} ({(work / 'workloads.npz').stat().st_size / 1e6:.1f} MB)")


# ---- the GPU machine: one run per process -------------------------------------------------------
def workload(name: str, work: Path, L: int, n_ff: int, k_total: int, seed: int, relu_density: float):
    """(f_place, f_run, note): the frequencies the hot set is chosen from and those the run draws from."""
    from hotcold.workloads import frequencies as wl

    if name.startswith("swiglu"):
        z = np.load(work / "workloads.npz")
        f_place, f_run = z["train"].astype(np.float64)[:L, :n_ff], z["test"].astype(np.float64)[:L, :n_ff]
        return f_place, f_run, "Qwen2.5-Coder-1.5B MBPP profiles (train: placement, test: run), mapped by depth"
    f0 = wl.synthetic(L, n_ff, seed)
    hot0 = wl.global_top_k_mask(f0, int(k_total))
    gamma = wl.density_power(f0, ~hot0, relu_density)
    f = np.clip(f0, 0, 1) ** gamma
    return f, f, f"synthetic power law, gamma {gamma:.3f} so that cold neurons fire {relu_density:.2f} of the time"


def tune_thresholds(eng, target: np.ndarray, rounds: int = 22) -> list[float]:
    """Threshold mode: bisect each layer's t (log scale) until its cold active fraction is target[l] (the
    fraction falls as t rises); one decoded token per round, after capture (the path the run times)."""
    lo, hi = np.full(eng.L, np.log(1e-6)), np.full(eng.L, np.log(10.0))
    n_cold = np.array([max(c.n_cold, 1) for c in eng.cl], dtype=np.float64)
    eng.reset()
    eng.step(1)
    got = np.zeros(eng.L)
    for _ in range(rounds):
        mid = 0.5 * (lo + hi)
        eng.thr = np.exp(mid)
        s0 = eng.cold_active_sum.copy()
        eng.step(None)
        got = (eng.cold_active_sum - s0) / n_cold
        over = got > target  # too many active: raise t
        lo = np.where(over, mid, lo)
        hi = np.where(over, hi, mid)
    eng.thr = np.exp(0.5 * (lo + hi))
    return [float(v) for v in got]


def child(spec: dict) -> dict:
    import torch

    from hotcold.bench.fits import predict_ms
    from hotcold.bench.runs import run_engine
    from hotcold.memory import placement_bytes
    from hotcold.model.config import shape
    from hotcold.runtime.build import random_quantized_model
    from hotcold.solver.hardware import HardwareSpec
    from hotcold.solver.costmodel import CostModel
    from hotcold.workloads import frequencies as wl

    name, L, quant, ctx_len = spec["name"], spec["layers"], spec["quant"], spec["ctx_len"]
    work = Path(spec["work"])
    t0 = time.perf_counter()
    dev = torch.device(spec.get("device", "cuda"))
    cuda = dev.type == "cuda"
    cfg = shape(SHAPE).replace(n_layers=L, max_seq_len=max(ctx_len, 64)) if spec.get("shape", SHAPE) == SHAPE \
        else shape(spec["shape"]).replace(n_layers=L)
    if cuda:
        torch.zeros(1, device=dev)
    ctx0 = gpu_used() if cuda else 0  # the CUDA context (and anything else on the GPU), before any tensor
    mode = {"swiglu-threshold": "threshold", "all-gpu": "exact"}.get(name, "predictor")
    rank = spec["predictor_rank"] if mode == "predictor" else None
    acct = lambda n_hot: placement_bytes(cfg, n_hot, quant, ctx_len=ctx_len, cold_mode=mode,  # noqa: E731
                                         predictor_rank=rank)
    if name == "all-gpu":
        n_hot = np.full(L, cfg.n_ff)
        f_place = f_run = np.ones((L, cfg.n_ff))
        wnote = "every neuron computed (exact mode)"
        hot = np.ones((L, cfg.n_ff), bool)
    else:
        fixed = acct([0] * L).gpu_fixed
        per = (acct([1] * L).gpu_total - acct([0] * L).gpu_total) / L
        room = spec["cap_bytes"] - ctx0 - spec["slack_bytes"] - fixed
        k_total = max(0, int(room // per))
        f_place, f_run, wnote = workload(name, work, L, cfg.n_ff, k_total, spec["seed"], spec["relu_density"])
        hot = wl.global_top_k_mask(f_place, k_total)
        n_hot = hot.sum(1)
    perm = hot_first(f_place, hot)
    fr = np.take_along_axis(f_run, perm, axis=1)  # in the model's neuron order (hot first)
    hm = np.zeros_like(hot)
    for l in range(L):
        hm[l, : int(n_hot[l])] = True
    sel_f = fr
    if name == "swiglu-predictor":
        sel_f = np.clip(fr * spec["selected_over_active"], 0, 1)
    selector = None
    if mode == "predictor":
        from hotcold.runtime.selectors import SampledPredictor

        selector = SampledPredictor(sel_f, cfg.dim, rank, dev, torch.float16, bank_rows=32, seed=spec["seed"] + 1)
    account = acct([int(v) for v in n_hot])
    cold_target = np.array([fr[l][~hm[l]].mean() if (~hm[l]).any() else 0.0 for l in range(L)])
    eng = random_quantized_model(cfg, [int(v) for v in n_hot], quant, device=dev, seed=spec["seed"], max_len=ctx_len,
                                 cold_mode=mode, selector=selector, rule="gate",
                                 thresholds=[0.05] * L if mode == "threshold" else None,
                                 cpu_threads=spec.get("cpu_threads"))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # generation's freed blocks: not what the model holds
    t_build = time.perf_counter() - t0
    log(f"{name}: built {L} layers in {t_build:.0f} s, {int(n_hot.sum())} hot neurons, "
        f"account GPU {account.gpu_total / GiB:.2f} GiB, GPU used {gpu_used() / GiB if cuda else 0:.2f} GiB")
    if eng.cl[0].n_cold:
        eng.kernel.warm_up(eng.cl[0].gate.fmt)  # the numba JIT, before any timing
    tuned = None
    if mode == "threshold":
        eng.capture()
        tuned = tune_thresholds(eng, cold_target)
    r = run_engine(eng, spec["tokens"], spec["warm"])
    for _ in range(spec.get("rounds", 1) - 1):  # more rounds on the same model: the spread
        r.setdefault("rounds_ms_per_token", [r["ms_per_token"]])
        r2 = run_engine(eng, spec["tokens"], 2, gpu_probe=0)
        r["rounds_ms_per_token"].append(r2["ms_per_token"])
    n_cold = sum(c.n_cold for c in eng.cl)
    r["measured_cold_active_fraction"] = r["cold_active_per_token"] / max(n_cold, 1)
    r["target_cold_active_fraction"] = float((cold_target * np.array([c.n_cold for c in eng.cl])).sum() / max(n_cold, 1))
    if tuned is not None:
        r["tuned_cold_fraction_per_layer_last"] = tuned
        r["thresholds"] = [float(v) for v in eng.thr]
    r.update({"name": name, "cold_mode": mode, "quant": quant, "layers": L, "ctx_len": ctx_len, "workload": wnote,
              "n_hot_total": int(n_hot.sum()), "n_hot_per_layer": [int(v) for v in n_hot],
              "gpu_neuron_share": float(n_hot.sum() / (L * cfg.n_ff)), "predictor_rank": rank,
              "gpu_share_of_activations": float((fr * hm).sum() / max(fr.sum(), 1e-12)),
              "cold_mean_frequency": float(fr[~hm].mean()) if (~hm).any() else 0.0,
              "account": account.to_json(), "account_gpu_bytes": account.gpu_total,
              "build_s": t_build, "cuda_context_bytes": ctx0})
    if cuda:
        r["gpu_used_after_run_bytes"] = gpu_used()
        r["torch_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        r["torch_max_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    # the cost model on the rates measured beforehand (spec["hw"]), and the floor on the machine's read rates
    if spec.get("hw"):
        hw = HardwareSpec.from_json(spec["hw"])
        kw = {"predictor_rank": rank} if mode == "predictor" else {}
        cm = CostModel(cfg, hw, quant, cold_mode=mode, ctx_len=ctx_len, **kw)
        fm = sel_f if mode == "predictor" else np.array([np.where(hm[l], 1.0, cold_target[l]) for l in range(L)])
        r["predicted"] = predict_ms(cm, fm, hm)
        r["model_error"] = r["predicted"]["ms_per_token"] / r["ms_per_token"] - 1
    rates = spec.get("rates") or {}
    if rates:
        cold_b = r["cpu_MB_per_token"] * 1e6
        r["floor_ms"] = 1e3 * (r["gpu_bytes_per_token"] / rates["gpu_read_Bps"] + cold_b / rates["cpu_read_Bps"])
        r["ratio_to_floor"] = r["ms_per_token"] / r["floor_ms"]
        r["floor_note"] = ("GPU bytes read per token / GPU read rate + cold bytes the kernel read per token / CPU "
                           "read ceiling, both measured on this machine in this call; sides serial")
    r["total_s"] = time.perf_counter() - t0
    log(f"{name}: {r['ms_per_token']:.1f} ms/token (median {r['ms_per_token_median']:.1f}), cpu kernel "
        f"{r['cpu_kernel_ms_per_token']:.1f} ms @ {r['cpu_GBps'] or 0:.0f} GB/s, cold active "
        f"{r['measured_cold_active_fraction']:.3f} (target {r['target_cold_active_fraction']:.3f})"
        + (f", model {r['predicted']['ms_per_token']:.1f}" if "predicted" in r else ""))
    return r


def add_peer(path: Path, jsonl: Path, note: str) -> None:
    """Put llama.cpp's results (../shared/anchors/llamacpp/run.sh's jsonl) beside hotcold's, with the ratios:
    the -ngl config with the most GPU layers that held no more than the cap, and -ngl n_layer + 1."""
    res = json.loads(path.read_text())
    rows = [json.loads(l) for l in jsonl.read_text().splitlines() if l.strip()]
    L = res["settings"]["layers"]
    cap_mib = float(res["settings"]["cap"]) * 1024
    peer = [{"n_gpu_layers": r["n_gpu_layers"], "ms_per_token": 1e3 / r["avg_ts"], "tokens_per_s": r["avg_ts"],
             "gpu_mib_peak": r["gpu_mib_peak"], "n_threads": r.get("n_threads"), "type": r.get("type_k"),
             "model_size": r.get("model_size"), "build": r.get("build_commit")} for r in rows]
    res["llamacpp"] = {"runs": peer, "note": note, "file": str(jsonl)}
    part = [p for p in peer if p["n_gpu_layers"] <= L]
    full = [p for p in peer if p["n_gpu_layers"] > L]
    cmp = {}
    for name, r in res["runs"].items():
        if "ms_per_token" not in r:
            continue
        ref = full[0] if name == "all-gpu" and full else (max(part, key=lambda p: p["n_gpu_layers"]) if part else None)
        if ref is None:
            continue
        cmp[name] = {"llamacpp_ngl": ref["n_gpu_layers"], "llamacpp_ms_per_token": ref["ms_per_token"],
                     "llamacpp_gpu_GiB_peak": ref["gpu_mib_peak"] / 1024, "hotcold_ms_per_token": r["ms_per_token"],
                     "hotcold_gpu_GiB_peak": r.get("gpu_peak_GiB"),
                     "speedup_tokens_per_s": ref["ms_per_token"] / r["ms_per_token"],
                     "hotcold_holds_no_more": (r.get("gpu_peak_GiB") or 1e9) * 1024 <= ref["gpu_mib_peak"]}
    res["vs_llamacpp"] = cmp
    res["cap_GiB"] = cap_mib / 1024
    save(res, path)
    for k, v in cmp.items():
        log(f"{k}: {v['speedup_tokens_per_s']:.2f}x llama.cpp -ngl {v['llamacpp_ngl']} "
            f"({v['hotcold_ms_per_token']:.1f} vs {v['llamacpp_ms_per_token']:.1f} ms/token; GPU "
            f"{v['hotcold_gpu_GiB_peak']:.2f} vs {v['llamacpp_gpu_GiB_peak']:.2f} GiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", help="map the profiles into this folder and stop (CPU machine)")
    ap.add_argument("--hotsets", default="bench/.cache/hotsets/qwen2.5-coder-1.5b_s0.5")
    ap.add_argument("--work", default="bench/.cache/q70b")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--runs", default="swiglu-threshold,swiglu-predictor,relu-predictor,all-gpu")
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--cap", default="23.5", help="GiB the GPU may show in use (nvidia-smi), context included")
    ap.add_argument("--slack", default="0.35", help="GiB kept out of the hot set for allocator, graphs, Triton")
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--predictor-rank", type=int, default=128)
    ap.add_argument("--relu-density", type=float, default=0.10)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", default=SHAPE, help="tiny for a CPU smoke run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rates", help=argparse.SUPPRESS)
    ap.add_argument("--add-peer", nargs=2, metavar=("RESULT_JSON", "LLAMACPP_JSONL"),
                    help="put llama.cpp's results beside a result of this script, with the ratios")
    ap.add_argument("--peer-note", default="")
    a = ap.parse_args()
    if a.add_peer:
        add_peer(Path(a.add_peer[0]), Path(a.add_peer[1]), a.peer_note)
        return
    if a.rates:
        save(measure_rates(SHAPE, a.quant, a.cpu_threads, log), Path(a.rates))
        return
    if a.child:
        spec = json.loads(Path(a.child).read_text())
        res = child(spec)
        save(res, Path(spec["result"]))
        return
    if a.prepare:
        prepare(Path(a.prepare), Path(a.hotsets), a.layers, a.seed)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"q70b_{a.quant}_{a.layers}L.json"
    res = {"benchmark": "hotcold on a LLaMA-2-70B-shaped model at 4 bits, all layers built and run, batch-1 decode",
           "command": " ".join([Path(sys.executable).name] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "weights": "random quantized bytes generated on the GPU; not a trained model",
           "settings": vars(a), "runs": {}}
    meta = Path(a.work) / "workloads.json"
    res["workloads"] = json.loads(meta.read_text()) if meta.exists() else None
    t0 = time.perf_counter()
    log("measuring rates (own process)")
    rates = {}
    if a.device == "cuda":
        rp = out / ".q70b_rates.json"
        p = subprocess.run([sys.executable, __file__, "--rates", str(rp), "--quant", a.quant]
                           + (["--cpu-threads", str(a.cpu_threads)] if a.cpu_threads else []), text=True)
        rates = json.loads(rp.read_text()) if p.returncode == 0 and rp.exists() else {}
        rp.unlink(missing_ok=True)
    res["rates"] = rates
    hw = None
    if rates:
        hw = machine_spec(rates, "h200-measured-q4")
        res["hardware_for_predictions"] = hw.to_json()
        read = {"gpu_read_Bps": max(rates["gpu_gemv_GBps"], rates.get("gpu_q4_gemv_GBps", 0)) * 1e9,
                "cpu_read_Bps": rates["cpu_read_ceiling"]["GBps_median"] * 1e9}
    else:
        read = {}
    save(res, path)
    sel = res["workloads"]["predictor_selected_over_active"] if res["workloads"] else 1.5
    for name in [s.strip() for s in a.runs.split(",") if s.strip()]:
        spec = {"name": name, "layers": a.layers, "quant": a.quant, "ctx_len": a.ctx_len, "work": a.work,
                "cap_bytes": int(float(a.cap) * GiB), "slack_bytes": int(float(a.slack) * GiB),
                "tokens": a.tokens, "warm": a.warm, "rounds": a.rounds, "predictor_rank": a.predictor_rank,
                "relu_density": a.relu_density, "seed": a.seed, "selected_over_active": sel, "device": a.device,
                "cpu_threads": a.cpu_threads, "shape": a.shape, "hw": hw.to_json() if hw else None, "rates": read,
                "result": str(out / f".q70b_{name}.json")}
        sp = out / f".q70b_{name}.spec.json"
        sp.write_text(json.dumps(spec))
        log(f"run {name}")
        with NvSampler() as nv:
            p = subprocess.run([sys.executable, __file__, "--child", str(sp)], stderr=subprocess.PIPE, text=True)
        for line in p.stderr.splitlines()[-6:]:
            log(f"  {name}: {line}")
        if p.returncode != 0 or not Path(spec["result"]).exists():
            res["runs"][name] = {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-3000:]}
        else:
            r = json.loads(Path(spec["result"]).read_text())
            r["gpu_mib_peak_nvidia_smi"] = nv.peak
            r["gpu_peak_GiB"] = nv.peak / 1024
            r["within_cap"] = nv.peak / 1024 <= float(a.cap) if name != "all-gpu" else None
            res["runs"][name] = r
            Path(spec["result"]).unlink()
        sp.unlink()
        res["elapsed_s"] = time.perf_counter() - t0
        save(res, path)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
