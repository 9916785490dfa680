"""The LLaMA-70B-shaped benchmark on the GPU machine: environment, kernel calibration, then `hotcold bench`.

    # here (CPU machine): map the profiles and solve the placements (needs pulp), into an ignored folder
    PYTHONPATH=. python bench/bench_70b.py --prepare bench/.cache/plc --profile bench/.cache/prof/mbpp --shift-profile bench/.cache/prof/prose

    # on the GPU machine (carry bench/.cache):
    PYTHONPATH=. python bench/bench_70b.py --out $OUT --profile bench/.cache/prof/mbpp --shift-profile bench/.cache/prof/prose \
        --placements bench/.cache/plc

Writes calib.json (device numbers + cold-kernel table), hw_measured.json (a HardwareSpec) and
bench_70b.json (every run, with the command) to --out; each is rewritten as results arrive.
Random weights, generated on the device; results per layer extrapolated to 80 layers, labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path



def log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)


def env() -> dict:
    import torch

    e = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import numba

        e["numba"] = numba.__version__
        e["numba_threads"] = numba.get_num_threads()
        e["numba_threading_layer_config"] = numba.config.THREADING_LAYER
    except ImportError:
        e["numba"] = None
    for cmd, key in ((["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                       "--format=csv,noheader"], "nvidia_smi"), (["lscpu"], "lscpu"), (["free", "-g"], "free")):
        try:
            e[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()[:3000]
        except (OSError, subprocess.TimeoutExpired) as ex:
            e[key] = f"unavailable: {ex}"
    return e


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--profile")
    ap.add_argument("--shift-profile")
    ap.add_argument("--placements", help="folder with fixed/ and adaptive/ Placement dirs (else solved here)")
    ap.add_argument("--prepare", help="only map the workload and solve the placements into this folder")
    ap.add_argument("--shape", default="llama2-70b")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--gpu-budget-gb", type=float, default=48.0)
    ap.add_argument("--cold-density", type=float, default=0.10)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dyn-tokens", type=int, default=192)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--skip-calib", action="store_true")
    ap.add_argument("--calib-only", action="store_true")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--predict-hw", help="a HardwareSpec JSON to predict with too (e.g. an earlier run's hw_measured.json)")
    ap.add_argument("--runs", default="dense-gpu,layer-split,stream,hotcold-fixed,hotcold-adaptive,hotcold-dynamic,threshold")
    ap.add_argument("--cpu-threads", type=int)
    ap.add_argument("--probe-threads", action="store_true",
                    help="measure the engine-like kernel call pattern under several threading settings, "
                         "then run the bench under the best one")
    ap.add_argument("--call-pattern", help="(internal) measure the call pattern, write JSON here")
    ap.add_argument("--probe-kernels", default="1s,4s,4d,8d",
                    help="cold kernel variants the probe times: GROUP then s (static) or d (dynamic schedule)")
    ap.add_argument("--probe-variants", default="default,omp-active", help="threading variants the probe runs")
    ap.add_argument("--probe-size", default="8192,22938,10",
                    help="the call-pattern probe's dim,rows,layers (default: a 70B layer's cold rows, 10 layers)")
    ap.add_argument("--use-probe", help="take the threading from this earlier thread_probe.json instead of probing")
    ap.add_argument("--gpu-kernels", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--dyn-margin", type=float, default=2.0, help="dynamic mode's noise margin (standard errors)")
    ap.add_argument("--no-check", action="store_true", help="skip the Triton-vs-torch logits check")
    ap.add_argument("--cpu-group", type=int, help="neurons the cold kernel streams side by side (1, 2, 4, 8)")
    ap.add_argument("--cpu-dynamic", action="store_true", help="the cold kernel's dynamic schedule (predictor mode)")
    ap.add_argument("--cpu-rate-gbps", type=float,
                    help="the cold kernel's rate in the engine's call pattern (from the probe): the measured "
                         "HardwareSpec's cpu.bandwidth")
    ap.add_argument("--cpu-read-gbps", type=float,
                    help="this machine's CPU read ceiling (from the probe): the CPU side of the machine floor")
    a = ap.parse_args()
    if a.call_pattern:
        from hotcold.runtime.calib import call_pattern
        from hotcold.bench.harness import save_json

        n = os.cpu_count() or 1
        dim, rows, layers = (int(v) for v in a.probe_size.split(","))
        kernels = tuple((int(k[:-1]), k[-1] == "d") for k in a.probe_kernels.split(","))
        save_json(call_pattern((n,), dim=dim, rows=rows, layers=layers, kernels=kernels, log=log), a.call_pattern)
        return
    if a.probe_threads or a.use_probe:
        probe(a)
        return
    from hotcold.bench.harness import BenchOptions, prepare, run_bench, save_json
    from hotcold.memory import default_predictor_rank
    from hotcold.model.config import shape
    from hotcold.solver.hardware import resolve

    profiles = [p for p in (a.profile, a.shift_profile) if p]
    opts = BenchOptions(shape=a.shape, n_layers=a.layers, gpu_budget_full=int(a.gpu_budget_gb * 1e9), cold_density=a.cold_density,
                        tokens=a.tokens, dyn_tokens=a.dyn_tokens, max_len=a.max_len, profiles=profiles,
                        hardware=a.hardware, runs=tuple(a.runs.split(",")), cpu_threads=a.cpu_threads, log=log,
                        gpu_kernels=a.gpu_kernels, dyn_margin=a.dyn_margin, check=not a.no_check,
                        cpu_group=a.cpu_group, cpu_dynamic=a.cpu_dynamic)
    if a.prepare:
        cfg = shape(opts.shape).replace(n_layers=opts.n_layers, max_seq_len=max(opts.max_len, 64))
        hw = resolve(preset_name=a.hardware) if not a.hardware.endswith(".json") else resolve(path=a.hardware)
        res: dict = {}
        prep = prepare(opts, cfg, "float16", hw, default_predictor_rank(cfg), res)
        for pol, p in prep["placements"].items():
            p.save(Path(a.prepare) / pol)
        print(json.dumps(res, indent=1, default=str)[:3000])
        return
    if a.predict_hw:
        from hotcold.solver.hardware import HardwareSpec

        opts.predict_hw.append(("measured_hw", HardwareSpec.load(a.predict_hw)))
    if a.placements:
        opts.placements = {pol: str(Path(a.placements) / pol) for pol in ("fixed", "adaptive")
                           if (Path(a.placements) / pol).is_dir()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    calib = {"command": command, "env": env(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    log(json.dumps({k: v for k, v in calib["env"].items() if k not in ("lscpu",)}, default=str)[:1500])
    save_json(calib, out / "calib.json")
    from hotcold.runtime.calib import cold_kernel_table, device_numbers, measured_spec

    try:  # seconds: always (the machine floor and the measured HardwareSpec need it)
        calib["device"] = device_numbers(log)
    except Exception as ex:  # noqa: BLE001 - keep going, record what broke
        calib["device_error"] = repr(ex)
    save_json(calib, out / "calib.json")
    if not a.skip_calib:
        try:
            from hotcold.runtime.calib import triton_gemv_probe

            calib["gemv_probe"] = triton_gemv_probe(log)
        except Exception as ex:  # noqa: BLE001
            calib["gemv_probe_error"] = repr(ex)
        try:
            n = os.cpu_count() or 1
            calib["cold_kernel"] = cold_kernel_table(threads=(a.cpu_threads or n,), log=log,
                                                     backends=("numba",), dtypes=("float16",))
        except Exception as ex:  # noqa: BLE001
            calib["cold_kernel_error"] = repr(ex)
        save_json(calib, out / "calib.json")
    rows = [r for r in calib.get("cold_kernel", []) if r["dtype"] == "float16" and r["mode"] == "predictor"
            and r["backend"] == "numba"]
    dev_m = dict(calib.get("device", {}))
    gemv = [r["GBps"] for r in calib.get("gemv_probe", []) if "GBps" in r]
    if gemv:  # the engine's GEMVs are Triton's where it is there: the better of the two rates
        dev_m["gpu_gemv_GBps"] = max(gemv + [dev_m.get("gpu_gemv_GBps", 0.0)])
    cpu_rate = a.cpu_rate_gbps or max((r["GBps"] for r in rows), default=None)
    if cpu_rate and "gpu_gemv_GBps" in dev_m:
        # the CPU rate the engine gets (the probe's call pattern) when known, else the kernel table's
        spec = measured_spec(dev_m, cpu_rate)
        spec.save(out / "hw_measured.json")
        opts.predict_hw = [("measured_hw", spec)]
    if "gpu_copy_GBps_read_plus_write" in dev_m:
        import dataclasses

        from hotcold.solver.hardware import preset

        # this machine's ceilings: device copy rate, and the CPU read ceiling (probe) or torch's sum
        base = preset("h200")
        cpu_read = a.cpu_read_gbps or dev_m.get("cpu_sum_GBps")
        opts.floor_hw = dataclasses.replace(
            base, name="this-machine-ceilings",
            gpu=dataclasses.replace(base.gpu, bandwidth=dev_m["gpu_copy_GBps_read_plus_write"] * 1e9),
            cpu=dataclasses.replace(base.cpu, bandwidth=cpu_read * 1e9))
        calib["machine_floor"] = {"gpu_GBps": dev_m["gpu_copy_GBps_read_plus_write"], "cpu_GBps": cpu_read,
                                  "cpu_source": ("probe read ceiling (calib.read_ceiling)" if a.cpu_read_gbps
                                                 else "torch sum")}
        save_json(calib, out / "calib.json")
    if a.calib_only:
        return
    res_path = out / "bench_70b.json"

    def ck(r):
        r["command"] = command
        save_json(r, res_path)

    opts.checkpoint = ck
    res = run_bench(opts)
    res["command"] = command
    save_json(res, res_path)
    from hotcold.bench.cli import print_table

    print_table(res)


def probe(a) -> None:
    """Each threading setting in its own process (the layer is chosen at start), then the bench under the best."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # run 4 measured binding OpenMP threads (OMP_PROC_BIND=close, OMP_PLACES=cores) at 6 GB/s in this VM and
    # the workqueue layer 25% slower: only the two that can win are probed
    variants = {"default": {}, "omp-active": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "ACTIVE"}}
    rows = []
    if a.use_probe:
        rows = json.loads(Path(a.use_probe).read_text())
        variants_run: dict = {}
    else:
        variants_run = {k: v for k, v in variants.items() if k in a.probe_variants.split(",")}
    for name, extra in variants_run.items():
        path = out / f"probe_{name}.json"
        env = {**os.environ, **extra}
        r = subprocess.run([sys.executable, __file__, "--call-pattern", str(path), "--probe-size", a.probe_size,
                            "--probe-kernels", a.probe_kernels],
                           env=env, text=True,
                           capture_output=True, timeout=240)
        print(r.stdout[-1500:], r.stderr[-800:], flush=True)
        if r.returncode == 0 and path.exists():
            for row in json.loads(path.read_text()):
                rows.append({**row, "variant": name})
            path.unlink()
    if not a.use_probe:
        (out / "thread_probe.json").write_text(json.dumps(rows, indent=1))
    kernel_rows = [r for r in rows if r.get("group", 1) > 0]
    peaks = [r["GBps_median"] for r in rows if r.get("kind") == "read_peak"]
    argv = [x for i, x in enumerate(sys.argv[1:]) if x not in ("--probe-threads", "--use-probe")
            and (i == 0 or sys.argv[i] != "--use-probe")]
    best_env = {}
    if kernel_rows:
        best = min(kernel_rows, key=lambda r: r["ms_median"])
        best_env = variants[best["variant"]]
        log(f"best cold kernel: {best['variant']} threading, {best['threads']} threads, group {best.get('group', 1)}, "
            f"{'dynamic' if best.get('dynamic') else 'static'} schedule ({best['ms_median']:.3f} ms per call, "
            f"{best['GBps_median']:.1f} GB/s); read peak {max(peaks, default=0):.1f} GB/s")
        for flag, val in (("--cpu-threads", best["threads"]), ("--cpu-group", best.get("group", 1)),
                          ("--cpu-rate-gbps", round(best["GBps_median"], 2))):
            if flag not in argv:
                argv += [flag, str(val)]
        if best.get("dynamic") and "--cpu-dynamic" not in argv:
            argv.append("--cpu-dynamic")
    if peaks and "--cpu-read-gbps" not in argv:
        argv += ["--cpu-read-gbps", str(round(max(peaks), 2))]
    os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **best_env})


if __name__ == "__main__":
    main()
