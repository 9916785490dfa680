"""`hotcold study` and `hotcold demo`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from hotcold.clikit import JsonOpt, ModelOpt, command, err, out, print_json, progress


def _run(cfg, json_out: bool) -> dict:
    from rich.table import Table

    from hotcold.study.report import table_rows, visible_columns, write_reports
    from hotcold.study.study import run_study

    with progress(disable=json_out) as bar:
        tasks: dict[str, int] = {}

        def step(what: str, done: int, total: int) -> None:
            key = "profile" if what == "profile" else "runs"
            if key not in tasks:
                tasks[key] = bar.add_task("profiling" if key == "profile" else "solve → export → run", total=total, info="")
            bar.update(tasks[key], completed=done, total=total, info=what if key == "runs" else "")

        results = run_study(cfg, log=lambda s: err.print(f"[dim]{s}[/]"), progress=step)
    results["command"] = "hotcold " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md, html = write_reports(results, cfg.out)
    import json

    (Path(cfg.out) / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    if json_out:
        print_json(results)
        return results
    hw = results["hardware"]["name"]
    t = Table(title=f"{results['config']['model']}: dense decode {results['dense']['measured_decode_ms_per_token']:.1f} "
                    f"ms/token here; 'model ms' = cost model on {hw}, 'meas ms' = measured here", title_justify="left")
    cols = visible_columns(results)
    for _, h, _ in cols:
        t.add_column(h, justify="right", no_wrap=True)
    for row in table_rows(results, cols):
        t.add_row(*row)
    out.print(t)
    out.print(f"report: {html}  (markdown: {md}; data: {Path(cfg.out) / 'results.json'})")
    return results


def study_cmd(
    model: ModelOpt = "smollm2-135m",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="mbpp, mbpp:PATH, embedded, jsonl:PATH.")] = "mbpp",
    profile_split: Annotated[str, typer.Option("--profile-split", help="Split to profile on.")] = "train",
    eval_split: Annotated[str, typer.Option("--eval-split", help="Split to evaluate on.")] = "test",
    profile_limit: Annotated[int, typer.Option("--profile-limit", min=1, help="Prompts to profile.")] = 24,
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help="Prompts for quality metrics.")] = 6,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma list of GPU budgets: bytes (2GiB) or ffn:FRACTION.")] = "ffn:0.1,ffn:0.3,ffn:0.6",
    policies: Annotated[str, typer.Option("--policies", help="Comma list: fixed, fixed:tau=T, impact, adaptive.")] = "fixed,impact,adaptive",
    sparsity: Annotated[float, typer.Option("--sparsity", help="Activation sparsity t_l is calibrated for.")] = 0.5,
    thresholds: Annotated[str, typer.Option("--thresholds", help="Activation thresholds to compare: layer (per-layer t_l), global (one t for all layers), or layer,global.")] = "layer",
    hardware: Annotated[str, typer.Option("--hardware", help="Target machine of the cost model: a preset (pc-high, pc-low, h200), a spec JSON, or 'calibrate' (this machine).")] = "pc-high",
    pass_at_1: Annotated[int, typer.Option("--pass-at-1", min=0, help="Tasks to generate and test in the sandbox per run (0 skips).")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights: float32, float16 or bfloat16 (float16 on a GPU).")] = "float32",
    device: Annotated[str, typer.Option("--device", help="Where the dense reference, profiler and the GPU part run: cpu, cuda or auto.")] = "auto",
    engine: Annotated[str, typer.Option("--engine", help="Decode timing: runtime (hotcold run), accel (the GPU engine, hotcold bench) or auto (accel on CUDA).")] = "auto",
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens decoded for each speed measurement.")] = 32,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Results directory.")] = Path("hotcold-study"),
    json_out: JsonOpt = False,
) -> None:
    """Compare placement policies at several GPU budgets: profile once, solve, export and run each.

    Writes results.json, results.csv, report.md and report.html (latency vs GPU memory per policy,
    quality, per-layer τ_l) to --out.

    Example: hotcold study --budgets ffn:0.1,ffn:0.3 --policies fixed,adaptive --pass-at-1 10

    At LLaMA-70B shape on a GPU (random weights with a skewed workload, SmolLM2's tokenizer):
    hotcold study -m random:llama2-70b:n_layers=4,workload=synthetic,tokenizer=smollm2-135m,gen=auto
    --dtype float16 --hardware h200 --policies fixed,adaptive,dynamic
    """
    from hotcold.study.study import StudyConfig

    cfg = StudyConfig(model=model, dataset=dataset, profile_split=profile_split, eval_split=eval_split,
                      profile_limit=profile_limit, eval_limit=eval_limit,
                      budgets=[b.strip() for b in budgets.split(",") if b.strip()],
                      policies=[p.strip() for p in policies.split(",") if p.strip()], sparsity=sparsity,
                      thresholds=[t.strip() for t in thresholds.split(',') if t.strip()], hardware=hardware, pass_at_1=pass_at_1,
                      dtype=dtype, device=device, engine=engine, speed_new_tokens=new_tokens, out=out_dir)
    _run(cfg, json_out)


def demo_cmd(
    mbpp: Annotated[str, typer.Option("--mbpp", help="Path to MBPP's mbpp.jsonl (default: $HOTCOLD_MBPP or ../shared/data; else the embedded prompts).")] = "",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its artifacts and report.")] = Path("hotcold-demo"),
    json_out: JsonOpt = False,
) -> None:
    """The whole idea in a few minutes on a laptop: SmolLM2-135M profiled, placed (fixed vs adaptive) at
    three GPU budgets, exported, run, and compared with the dense model.

    Example: hotcold demo
    """
    from hotcold.study.study import StudyConfig
    from hotcold.workloads import find_mbpp

    path = Path(mbpp) if mbpp else find_mbpp()
    if mbpp and not path.is_file():
        from hotcold.errors import InputError

        raise InputError(f"--mbpp {mbpp} does not exist", "pass the path of mbpp.jsonl, or omit --mbpp to use the embedded prompts")
    if path:
        dataset, psplit, esplit = f"mbpp:{path}", "train", "test"
        err.print(f"[dim]workload: MBPP at {path} (profile: train split, evaluate: test split)[/]")
    else:
        dataset, psplit, esplit = "embedded", None, None
        err.print("[dim]workload: hotcold's embedded Python tasks (no MBPP found; pass --mbpp PATH to use it)[/]")
    cfg = StudyConfig(model="smollm2-135m", dataset=dataset, profile_split=psplit, eval_split=esplit,
                      profile_limit=16, eval_limit=4, budgets=["ffn:0.1", "ffn:0.3", "ffn:0.6"],
                      policies=["fixed", "adaptive"], hardware="pc-high", out=out_dir, speed_new_tokens=16)
    _run(cfg, json_out)


def register(app: typer.Typer) -> None:
    app.command("study")(command(study_cmd))
    app.command("demo")(command(demo_cmd))
