"""`hotcold solve`, `hotcold report`, `hotcold calibrate`: a thin shell over hotcold.solver.

Nothing heavy is imported here at module level: numpy, PuLP, matplotlib and torch load inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hotcold.clikit import JsonOpt, command, err, out, print_json

ProfileOpt = Annotated[Path, typer.Option("--profile", help="Profile directory (from `hotcold profile`).")]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", help="Hardware preset: pc-high, pc-low, h200 (the H200 machine's device rates) or h200-decode "
                     "(what hotcold's engine achieved there: lower rates + host overhead per split layer).")]
HardwareOpt = Annotated[Optional[Path], typer.Option("--hardware", help="Hardware spec JSON (from `hotcold calibrate`).")]
GpuBudgetOpt = Annotated[Optional[str], typer.Option(
    "--gpu-budget", help="GPU memory for hotcold's tensors: 24GiB, 48GB, 512MiB or bytes. Default: the GPU's memory less its reserve.")]
CpuBudgetOpt = Annotated[Optional[str], typer.Option(
    "--cpu-budget", help="CPU memory for the cold neurons and buffers. Default: the CPU's memory less its reserve.")]
PolicyOpt = Annotated[str, typer.Option("--policy", help="fixed (one global τ), impact (PowerInfer's ILP) or adaptive (latency MILP).")]
TauOpt = Annotated[Optional[float], typer.Option("--tau", help="fixed only: hot iff f ≥ τ in every layer; without it the global τ that fills the budget.")]
GroupOpt = Annotated[int, typer.Option("--group-size", help="Neurons per ILP block (1: neuron-exact, larger: faster).")]
ColdModeOpt = Annotated[str, typer.Option("--cold-mode", help="How the runtime finds active cold neurons: threshold (reads every cold gate row), predictor, exact (all cold rows).")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx-len", help="Context length the KV cache is sized for and latency modelled at. Default: the model's maximum.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Weight dtype: float16, bfloat16, float32, q8_0, q4_0. Default: the hardware spec's.")]
TimeOpt = Annotated[float, typer.Option("--time-limit", help="Seconds the MILP may take; on the limit the best placement and its gap are reported.")]
GapOpt = Annotated[float, typer.Option("--mip-gap", help="Relative optimality gap at which the MILP stops (1e-3 = 0.1%); the placement reports the gap it proved.")]
MinHotOpt = Annotated[Optional[bool], typer.Option("--min-hot/--no-min-hot", help="Enforce C_l (a layer has no hot neuron or at least C_l). Default: on for impact and adaptive, off for fixed.")]
SolverOpt = Annotated[str, typer.Option("--solver", help="Backend: auto (an exact dynamic programme for large reduced problems, else HiGHS if installed, else CBC), cbc, highs, dp.")]
PhaseOpt = Annotated[str, typer.Option("--phase", help="Which profiled tokens give the frequencies: decode, prefill or all.")]
CompareOpt = Annotated[bool, typer.Option("--compare", help="Solve fixed, impact and adaptive for the same budgets; --out gets one directory per policy.")]
SparseOpt = Annotated[bool, typer.Option("--gpu-sparse", help="Model a GPU side that skips inactive hot rows (needs --cold-mode predictor and a measured sparse bandwidth).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Placement directory to write (with --compare: a directory of them). Omit to only print.")]

SOLVE_HELP = """Place FFN neurons on GPU or CPU under memory budgets and write a Placement.

Examples:

  hotcold solve --profile prof/ --preset h200 --gpu-budget 48GiB -o place/

  hotcold solve --profile prof/ --hardware hw.json --policy fixed --tau 0.05 -o place-fixed/

  hotcold solve --profile prof/ --preset h200 --gpu-budget 48GiB --cold-mode predictor --compare -o places/ --json
"""


def register(app: typer.Typer) -> None:
    app.command("solve", help=SOLVE_HELP)(solve_cmd)
    app.command("report", help=REPORT_HELP)(report_cmd)
    app.command("calibrate", help=CALIBRATE_HELP)(calibrate_cmd)


@command
def solve_cmd(
    profile: ProfileOpt,
    out_dir: OutOpt = None,
    preset: PresetOpt = None,
    hardware: HardwareOpt = None,
    gpu_budget: GpuBudgetOpt = None,
    cpu_budget: CpuBudgetOpt = None,
    policy: PolicyOpt = "adaptive",
    tau: TauOpt = None,
    group_size: GroupOpt = 64,
    cold_mode: ColdModeOpt = "threshold",
    ctx_len: CtxOpt = None,
    dtype: DtypeOpt = None,
    time_limit: TimeOpt = 10.0,
    mip_gap: GapOpt = 1e-4,
    min_hot: MinHotOpt = None,
    solver: SolverOpt = "auto",
    phase: PhaseOpt = "decode",
    gpu_sparse: SparseOpt = False,
    compare: CompareOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.profiler.artifact import Profile
    from hotcold.solver.hardware import resolve
    from hotcold.solver.report import comparison_table, summary_text
    from hotcold.solver.solve import POLICIES, solve

    hw = resolve(preset, hardware)
    prof = Profile.load(profile)
    policies = list(POLICIES) if compare else [policy]
    if compare and policy not in POLICIES:
        policies.append(policy)  # solve() reports the unknown policy
    log = lambda s: err.print(f"[dim]{s}[/]")  # noqa: E731
    results = []
    for pol in policies:
        err.print(f"solving [bold]{pol}[/] for {prof.model_config.name} on {hw.name} …")
        pl = solve(prof, hw, policy=pol, gpu_budget=gpu_budget, cpu_budget=cpu_budget,
                   tau=tau if pol == "fixed" or not compare else None, group_size=group_size, cold_mode=cold_mode, ctx_len=ctx_len,
                   time_limit=time_limit, dtype=dtype, min_hot=min_hot, mip_gap=mip_gap, solver=solver, phase=phase,
                   gpu_sparse=gpu_sparse, log=log)
        if out_dir is not None:
            pl = pl.save(out_dir / pol if compare else out_dir)
            err.print(f"wrote {pl.path}")
        results.append(pl)
    if out_dir is None:
        err.print("no --out given: nothing written")
    main = next((p for p in results if p.policy == policy), results[-1])
    if json_out:
        obj = main.summary()
        if compare:
            obj["compare"] = [p.summary() for p in results]
        print_json(obj)
        return
    out.print(comparison_table(results))
    for para in summary_text(results):
        out.print(para.replace("**", ""))


REPORT_HELP = """Show placements: per-layer table with why each layer got its share, policy comparison, plots.

Examples:

  hotcold report place/

  hotcold report places/fixed places/impact places/adaptive --html report.html --markdown report.md
"""


@command
def report_cmd(
    placements: Annotated[list[Path], typer.Argument(help="Placement directories (from `hotcold solve`).")],
    html_path: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    md_path: Annotated[Optional[Path], typer.Option("--markdown", help="Write a markdown report here (plots as PNG files beside it).")] = None,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Print the per-layer tables.")] = True,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.solver.placement import Placement
    from hotcold.solver.report import comparison_table, layer_table, summary_text, write_reports

    pls = [Placement.load(p) for p in placements]
    fps = {p.fingerprint for p in pls}
    if len(fps) > 1:
        err.print(f"[yellow]note: these placements are of {len(fps)} different models[/]")
    written = write_reports(pls, html_path, md_path)
    for w in written:
        err.print(f"wrote {w}")
    if json_out:
        print_json({"placements": [p.summary() | {"layers": p.layers} for p in pls],
                    "explanation": summary_text(pls), "written": [str(w) for w in written]})
        return
    if layers:
        for p in pls:
            out.print(layer_table(p))
    out.print(comparison_table(pls))
    for para in summary_text(pls):
        out.print(para.replace("**", ""))


CALIBRATE_HELP = """Measure this machine's bandwidths (CPU always; GPU, PCIe and sync with CUDA) into a hardware spec.

Takes under a minute. Examples:

  hotcold calibrate --out hw.json

  hotcold calibrate --preset h200 --out h200.json     (write a preset to a file to edit it)
"""


@command
def calibrate_cmd(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Hardware spec JSON to write.")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="Write this preset instead of measuring.")] = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Upper bound on the time measurements take.")] = 40.0,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weight dtype to measure with (default: float16 with CUDA, else float32).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.solver.hardware import calibrate, preset as get_preset

    if preset:
        spec = get_preset(preset)
    else:
        err.print("measuring (under a minute) …")
        spec = calibrate(dtype=dtype, seconds=seconds, threads=threads, log=lambda s: err.print(f"[dim]{s}[/]"))
    spec.save(out_path)
    err.print(f"wrote {out_path}")
    if json_out:
        print_json(spec.to_json())
        return
    out.print(f"{spec.name}: GPU {spec.gpu.name} {spec.gpu.bandwidth / 1e9:.1f} GB/s, "
              f"CPU {spec.cpu.bandwidth / 1e9:.1f} GB/s ({spec.cpu.threads} threads), "
              f"PCIe {spec.link.pcie_bandwidth / 1e9:.1f} GB/s, sync {spec.link.sync_seconds * 1e6:.1f} µs"
              + (" — no CUDA: the GPU side runs on the CPU" if spec.link.shared_memory else ""))
