"""`hotcold bench`: the hybrid engine against the baselines, at equal GPU budget (see hotcold.bench.harness).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hotcold.clikit import JsonOpt, command, err, out, print_json

BENCH_HELP = """Benchmark hybrid GPU+CPU decode against all-on-GPU, layer split and streaming offload.

The model has a named shape (LLaMA-2-70B by default) with --layers layers of random weights generated on the device. Neuron frequencies come from --profile (the placements' workload) and --shift-profile (another workload), mapped by relative depth; without them a synthetic power law. Per-layer times are extrapolated to the full depth and labelled so. Writes JSON with --out; prints a table.

Examples:

  hotcold bench --layers 10 --gpu-budget 48GB --profile prof-mbpp/ --shift-profile prof-prose/ --out r.json

  hotcold bench --shape tiny --layers 4 --gpu-budget 80% --device cpu --tokens 4 --json

With --bundle DIR it times an exported Bundle instead (the model `hotcold run` builds from it, the same timing loop), and reports the GPU bytes it holds against the placement's memory account:

  hotcold bench --bundle out/bundle --cold-mode threshold --tokens 64 --json
"""


def register(app: typer.Typer) -> None:
    app.command("bench", help=BENCH_HELP)(bench_cmd)


@command
def bench_cmd(
    shape: Annotated[str, typer.Option("--shape", help="Named model shape (llama2-70b, tiny, ...).")] = "llama2-70b",
    layers: Annotated[int, typer.Option("--layers", help="Layers actually built and run.")] = 10,
    gpu_budget: Annotated[str, typer.Option("--gpu-budget", help="GPU budget at the model's full depth (48GB), or a share of the full model (35%); scaled to --layers.")] = "48GB",
    cold_density: Annotated[Optional[float], typer.Option("--cold-density", help="Rescale frequencies so cold neurons fire this often under the fixed placement (0 = keep as profiled).")] = 0.10,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Profile the placements are made from (workload 'matched').")] = None,
    shift_profile: Annotated[Optional[Path], typer.Option("--shift-profile", help="Profile of another workload of the same model ('shifted').")] = None,
    placement: Annotated[Optional[list[str]], typer.Option("--placement", help="POLICY=DIR: use this Placement instead of solving (repeatable).")] = None,
    hardware: Annotated[str, typer.Option("--hardware", help="Preset or HardwareSpec JSON for placements and predictions.")] = "h200",
    tokens: Annotated[int, typer.Option("--tokens", help="Timed decode tokens per run.")] = 32,
    warm: Annotated[int, typer.Option("--warm", help="Warm-up tokens per run (excluded).")] = 8,
    dyn_tokens: Annotated[int, typer.Option("--dyn-tokens", help="Timed tokens of the dynamic-vs-fixed runs.")] = 192,
    runs: Annotated[str, typer.Option("--runs", help="Comma list of runs: dense-gpu, layer-split, stream, hotcold-fixed, hotcold-adaptive, hotcold-dynamic, threshold.")] = "dense-gpu,layer-split,stream,hotcold-fixed,hotcold-adaptive,hotcold-dynamic,threshold",
    device: Annotated[str, typer.Option("--device", help="cuda, cpu or auto.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype: float16, bfloat16 or float32.")] = "float16",
    ctx_len: Annotated[int, typer.Option("--ctx-len", help="Context the KV cache is sized for (and the cost model assumes).")] = 512,
    cpu_kernel: Annotated[str, typer.Option("--cpu-kernel", help="auto, numba or torch.")] = "auto",
    cpu_threads: Annotated[Optional[int], typer.Option("--cpu-threads", help="Threads of the CPU kernel (default: all).")] = None,
    cpu_group: Annotated[Optional[int], typer.Option("--cpu-group", help="Cold neurons a numba thread streams side by side: 1, 2, 4 or 8 (default 4, or HOTCOLD_COLD_GROUP).")] = None,
    cpu_schedule: Annotated[Optional[str], typer.Option("--cpu-schedule", help="How numba threads share the cold rows: dynamic (chunks from a shared counter) or static (a fixed share each; bit-reproducible). Default dynamic, or HOTCOLD_COLD_DYNAMIC=0.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Weights and workload mapping seed.")] = 0,
    bundle: Annotated[Optional[Path], typer.Option("--bundle", help="Time this exported Bundle (as `hotcold run` builds it) instead of random weights; --shape, --layers, --gpu-budget, --profile and --runs do not apply.")] = None,
    cold_mode: Annotated[str, typer.Option("--cold-mode", help="With --bundle: exact, threshold or predictor (as `hotcold run --cold-mode`).")] = "threshold",
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the JSON result here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.bench.harness import BenchOptions, run_bench, save_json
    from hotcold.runtime.coldkernel import GROUPS
    from hotcold.errors import InputError
    from hotcold.memory import parse_bytes
    from hotcold.model.config import shape as get_shape

    if bundle is not None:
        _bench_bundle(bundle, cold_mode, tokens, warm, device, ctx_len, hardware, cpu_kernel, cpu_threads, out_file, json_out)
        return
    full = get_shape(shape)
    if layers < 1 or layers > full.n_layers:
        raise InputError(f"--layers {layers} is outside 1..{full.n_layers} for shape {shape}", "pass e.g. --layers 10")
    if gpu_budget.strip().endswith("%"):
        try:
            frac = float(gpu_budget.strip()[:-1]) / 100
        except ValueError:
            raise InputError(f"cannot read --gpu-budget {gpu_budget!r}", "write 48GB or 35%") from None
        budget = int(frac * full.n_params * 2)
    else:
        budget = parse_bytes(gpu_budget, "GPU budget")
    pl = {}
    for item in placement or []:
        pol, sep, d = item.partition("=")
        if not sep:
            raise InputError(f"--placement {item!r} is not POLICY=DIR", "pass e.g. --placement adaptive=plc/")
        pl[pol] = d
    profiles = [str(p) for p in (profile, shift_profile) if p is not None]
    if shift_profile is not None and profile is None:
        raise InputError("--shift-profile needs --profile", "pass both, or neither")
    if cpu_group is not None and cpu_group not in GROUPS:
        raise InputError(f"--cpu-group {cpu_group} is not supported", f"use one of {', '.join(map(str, GROUPS))}")
    if cpu_schedule is not None and cpu_schedule not in ("dynamic", "static"):
        raise InputError(f"--cpu-schedule {cpu_schedule!r} is not a schedule", "use dynamic or static")
    names = tuple(r.strip() for r in runs.split(",") if r.strip())
    opts = BenchOptions(shape=shape, n_layers=layers, gpu_budget_full=budget,
                        cold_density=cold_density if cold_density else None, tokens=tokens, warm=warm,
                        dyn_tokens=dyn_tokens, max_len=ctx_len, dtype=dtype, device=device, profiles=profiles,
                        placements=pl, hardware=hardware, runs=names, cpu_backend=cpu_kernel,
                        cpu_threads=cpu_threads, cpu_group=cpu_group,
                        cpu_dynamic=None if cpu_schedule is None else cpu_schedule == "dynamic",
                        seed=seed, log=lambda s: err.print(s, markup=False))
    if out_file is not None:
        opts.checkpoint = lambda r: save_json(r, out_file)
    res = run_bench(opts)
    if out_file is not None:
        save_json(res, out_file)
    if json_out:
        print_json(res)
        return
    print_table(res)


def _bench_bundle(bundle: Path, mode: str, tokens: int, warm: int, device: str, max_len: int, hardware: str,
                  cpu_kernel: str, cpu_threads: Optional[int], out_file: Optional[Path], json_out: bool) -> None:
    from rich.table import Table

    from hotcold.bench.bundle_run import bench_bundle
    from hotcold.bench.harness import save_json
    from hotcold.errors import InputError
    from hotcold.runtime.cli import MODES

    if mode not in MODES:
        raise InputError(f"unknown --cold-mode {mode!r}", f"use one of: {', '.join(MODES)}")
    res = bench_bundle(bundle, mode=mode, tokens=tokens, warm=warm, device=device, max_len=max_len,
                       hardware=hardware, log=lambda s: err.print(s, markup=False), cpu_backend=cpu_kernel,
                       cpu_threads=cpu_threads)
    if out_file is not None:
        save_json(res, out_file)
    if json_out:
        print_json(res)
        return
    t = Table(title=f"{bundle} ({mode} mode, context {res['ctx_len']}, {res['device']['gpu_side']})")
    for c in ("ms/token", "median", "tok/s", "CPU kernel ms", "floor ms", "x floor", "GPU GB held", "account GB"):
        t.add_column(c, justify="right")
    held = res.get("gpu_bytes_after_load")
    t.add_row(f"{res['ms_per_token']:.2f}", f"{res['ms_per_token_median']:.2f}", f"{res['tokens_per_s']:.1f}",
              f"{res['cpu_kernel_ms_per_token']:.2f}", f"{res['floor_ms']:.2f}", f"{res['ratio_to_floor']:.2f}",
              "-" if held is None else f"{held / 1e9:.3f}", f"{res['account_gpu_bytes'] / 1e9:.3f}")
    out.print(t)


def print_table(res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{res['shape']} x {res['n_layers']} layers ({res['weights']}), {res['device']}")
    for c in ("run", "ms/token", "tok/s", "model ms", "err", "GPU share", "CPU GB/s", "GPU GB/s",
              f"ms/token @{res['full_depth_layers']}L (extrap.)"):
        t.add_column(c, justify="right" if c != "run" else "left")

    def f(v, p=2):
        return "-" if v is None else f"{v:.{p}f}"

    for name, r in res["runs"].items():
        pred = (r.get("predicted") or {}).get("ms_per_token")
        t.add_row(name, f(r.get("ms_per_token")), f(r.get("tokens_per_s"), 1), f(pred),
                  f(100 * r["model_error"], 0) + "%" if r.get("model_error") is not None else "-",
                  f(r.get("gpu_share"), 3), f(r.get("cpu_GBps"), 1), f(r.get("gpu_GBps"), 0),
                  f(r.get("extrapolated_ms_per_token_full_depth"), 1))
    out.print(t)
    s = res.get("summary", {})
    if s:
        out.print({k: v for k, v in s.items() if k != "dynamic_migration"})
