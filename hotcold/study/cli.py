"""`hotcold study` and `hotcold demo`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hotcold.clikit import JsonOpt, ModelOpt, command, err, out, print_json, progress


def _execute(cfg, json_out: bool) -> dict:
    """Run the study with progress bars on stderr; write results.json and the reports into cfg.out."""
    import json

    from hotcold.study.report import write_reports
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
    write_reports(results, cfg.out)
    (Path(cfg.out) / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def _print_table(results: dict) -> None:
    """The results table, and under it what the numbers mean (report.conclusion_lines)."""
    from rich.table import Table

    from hotcold.study.report import conclusion_lines, table_rows, visible_columns

    hw = results["hardware"]["name"]
    t = Table(title=f"{results['config']['model']}: dense decode {results['dense']['measured_decode_ms_per_token']:.1f} "
                    f"ms/token here; 'model ms' = cost model on {hw}, 'meas ms' = measured here", title_justify="left")
    cols = visible_columns(results)
    for _, h, _ in cols:
        t.add_column(h, justify="right", no_wrap=True)
    for row in table_rows(results, cols):
        t.add_row(*row)
    out.print(t)
    out.print("\n".join(conclusion_lines(results)), markup=False)


def _run(cfg, json_out: bool) -> dict:
    results = _execute(cfg, json_out)
    if json_out:
        print_json(results)
        return results
    _print_table(results)
    out.print(f"report: {Path(cfg.out) / 'report.html'}  (markdown: {Path(cfg.out) / 'report.md'}; "
              f"data: {Path(cfg.out) / 'results.json'})")
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
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens decoded for each speed measurement.")] = 32,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Results directory.")] = Path("hotcold-study"),
    scale: Annotated[Optional[str], typer.Option("--scale", help="Study every policy at this shape (llama2-70b, tiny) on random quantized weights with real firing statistics (--stats), every layer built; see docs/results.md.")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="--scale: the statistics folder (workloads.npz, hotsets.json) that --prepare writes.")] = None,
    prepare: Annotated[Optional[Path], typer.Option("--prepare", help="--scale: map a real model's profiles onto the shape and replay its hot sets, into this folder, then stop (needs --profile-dir and --eval-profile).")] = None,
    profile_dir: Annotated[Optional[Path], typer.Option("--profile-dir", help="--prepare: the Profile the placements are solved from (e.g. MBPP train).")] = None,
    eval_profile: Annotated[Optional[list[str]], typer.Option("--eval-profile", help="--prepare: NAME=PROFILE_DIR of a held-out workload with per-sequence records (repeat: mbpp-test=..., humaneval=...).")] = None,
    hotsets: Annotated[Optional[list[str]], typer.Option("--hotsets", help="--prepare: NAME=hotsets.json of `hotcold profile hotsets` for that workload, instead of computing it.")] = None,
    predictors: Annotated[Optional[Path], typer.Option("--predictors", help="--prepare: bench/results/predictors.json: what the real predictors select per active neuron.")] = None,
    scenarios: Annotated[str, typer.Option("--scenarios", help="--scale: swiglu (the statistics), relu (synthetic, skewed), or both.")] = "swiglu,relu",
    quant: Annotated[str, typer.Option("--quant", help="--scale: weight format (q4, q8, q4a, q8a).")] = "q4",
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="--scale: timed rounds per run (the spread).")] = 3,
    layers: Annotated[Optional[int], typer.Option("--layers", min=1, help="--scale: layers to build (default: the shape's).")] = None,
    slack: Annotated[str, typer.Option("--slack", help="--scale: GPU memory kept out of the hot set under a byte budget (the allocator's rounding while the model is built, graphs, Triton).")] = "1.3GiB",
    trace_sequences: Annotated[int, typer.Option("--trace-sequences", min=1, help="--prepare: at most this many sequences of each eval kept as traces (the real model's firing block by block, which every swiglu policy decodes over).")] = 8,
    trace_blocks: Annotated[int, typer.Option("--trace-blocks", min=1, help="--prepare: whole sequences are kept while their blocks fit in this many (the decode time of a trace run).")] = 16,
    trace_tokens: Annotated[int, typer.Option("--trace-tokens", min=1, help="--scale: timed decode steps per block of a trace (the block's real tokens are what dynamic and per-prompt are charged over).")] = 1,
    cells: Annotated[str, typer.Option("--cells", help="--scale: only these SCENARIO@BUDGET cells of --scenarios x --budgets (e.g. relu@24GiB,swiglu@48GiB); default all.")] = "",
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
    if scale is not None or prepare is not None:
        _scale(scale, stats, prepare, profile_dir, eval_profile, hotsets, predictors, scenarios, quant, rounds, layers,
               budgets, policies, device, new_tokens, out_dir, json_out, slack, trace_sequences, trace_tokens, trace_blocks, cells)
        return
    from hotcold.study.study import StudyConfig

    cfg = StudyConfig(model=model, dataset=dataset, profile_split=profile_split, eval_split=eval_split,
                      profile_limit=profile_limit, eval_limit=eval_limit,
                      budgets=[b.strip() for b in budgets.split(",") if b.strip()],
                      policies=[p.strip() for p in policies.split(",") if p.strip()], sparsity=sparsity,
                      thresholds=[t.strip() for t in thresholds.split(',') if t.strip()], hardware=hardware, pass_at_1=pass_at_1,
                      dtype=dtype, device=device, speed_new_tokens=new_tokens, out=out_dir)
    _run(cfg, json_out)


def _pairs(items: list[str] | None, what: str) -> dict[str, Path]:
    from hotcold.errors import InputError

    out_: dict[str, Path] = {}
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{what} {it!r} is not NAME=PATH", f"pass e.g. {what} mbpp-test=prof/test")
        out_[name] = Path(path)
    return out_


def _scale(shape, stats, prep, profile_dir, eval_profile, hotsets, predictors, scenarios, quant, rounds, layers,
           budgets, policies, device, new_tokens, out_dir, json_out, slack="1.3GiB", trace_sequences=8,
           trace_tokens=1, trace_blocks=16, cells="") -> None:
    from hotcold.errors import InputError
    from hotcold.study import scale as sc

    log = lambda s: err.print(f"[dim]{s}[/]")  # noqa: E731
    if prep is not None:
        evals = _pairs(eval_profile, "--eval-profile")
        if profile_dir is None or not evals:
            raise InputError("--prepare needs --profile-dir and at least one --eval-profile NAME=DIR",
                             "pass e.g. --profile-dir prof/train --eval-profile mbpp-test=prof/test")
        path = sc.prepare(prep, profile_dir, evals, shape or "llama2-70b", layers, _pairs(hotsets, "--hotsets"),
                          predictors=predictors, trace_sequences=trace_sequences,
                          trace_blocks=trace_blocks, log=log)
        out.print(f"statistics: {path}")
        return
    if stats is None:
        raise InputError("--scale needs --stats DIR", "make it with --prepare DIR (on the machine with the profiles)")
    if budgets == "ffn:0.1,ffn:0.3,ffn:0.6":
        budgets = "24GiB,48GiB"
    pols = [p.strip() for p in policies.split(",") if p.strip()]
    if policies == "fixed,impact,adaptive":
        pols = list(sc.POLICIES)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = sc.ScaleConfig(shape=shape, layers=layers, stats=stats, quant=quant,
                         budgets=[b.strip() for b in budgets.split(",") if b.strip()],
                         scenarios=[s.strip() for s in scenarios.split(",") if s.strip()], policies=pols,
                         rounds=rounds, tokens=new_tokens if new_tokens != 32 else 16, device=device, out=out_dir,
                         slack=slack, trace_tokens=trace_tokens,
                         cells=[k.strip() for k in cells.split(",") if k.strip()])
    res = sc.run_scale(cfg, log=log)
    if json_out:
        print_json(res)
        return
    for row in res.get("summary") or []:
        vs = f"{row['speedup_vs_fixed']:.3f}x fixed" if "speedup_vs_fixed" in row else ""
        out.print(f"{row['cell']:>18} {row['eval']:>10} {row['policy']:>9}: {row['ms_per_token']:8.1f} ms/token "
                  f"(+{(row['with_migration'] or row['ms_per_token']) - row['ms_per_token']:.2f} migration) {vs}",
                  markup=False)
    out.print(f"report: {Path(out_dir) / 'report.md'}  (data: {Path(out_dir) / 'study_scale.json'})")


# What a demo run leaves in --out: the reports, their plots, the data, and the placements (kilobytes each;
# `hotcold export --placement` turns one into a Bundle again). Bundles (~0.5 GB each for SmolLM2 in fp32)
# and the profile stay in the work directory, which is removed at the end unless --keep.
DEMO_KEEPS = ("report.html", "report.md", "pareto.png", "tau_per_layer.png", "results.json", "results.csv",
              "hardware.json", "placements")


def demo_config(workload: Path | None, cuda: bool):
    """The demo's study: SmolLM2-135M, fixed vs adaptive at three GPU budgets.

    With MBPP it profiles the train split and evaluates on the test split; without, hotcold's embedded
    tasks split the same way (train 25-48, test 1-24), so evaluation is never on profiled prompts. On a
    CUDA machine the GPU side runs on the GPU (float16, CUDA graphs) and the cost model is calibrated
    on this machine, so modelled and measured times are of the same hardware; on a CPU the cost model is
    pc-high's (a desktop GPU + CPU), the machine the demo predicts for.
    """
    from hotcold.study.study import StudyConfig

    dataset = f"mbpp:{workload}" if workload else "embedded"
    return StudyConfig(model="smollm2-135m", dataset=dataset, profile_split="train", eval_split="test",
                       profile_limit=16, eval_limit=4, budgets=["ffn:0.1", "ffn:0.3", "ffn:0.6"],
                       policies=["fixed", "adaptive"], hardware="calibrate" if cuda else "pc-high",
                       dtype="float16" if cuda else "float32", device="auto",
                       speed_new_tokens=16)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _check_demo_out(out_dir: Path) -> None:
    """--out must be new, empty, or an earlier demo's output (which this run replaces)."""
    import json

    from hotcold.errors import InputError

    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file", "pass a directory path for the demo's report")
    if not any(out_dir.iterdir()):
        return
    try:
        kind = json.loads((out_dir / "results.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "study":
        raise InputError(f"--out {out_dir} holds files that are not a demo's output",
                         "pass another --out (the demo replaces only its own earlier output)")


def _relocate(results: dict, work: Path, out_dir: Path, keep: bool) -> dict:
    """Paths in the results as they are once the work directory is gone (bundles: None unless kept)."""
    def moved(p: str | None) -> str | None:
        if not p:
            return p
        try:
            return str(out_dir / Path(p).relative_to(work))
        except ValueError:
            return p

    for r in results["runs"]:
        r["placement"] = moved(r["placement"])
        r["bundle"] = moved(r["bundle"]) if keep else None
    results["profile"]["path"] = moved(results["profile"]["path"]) if keep else None
    results["config"]["out"] = str(out_dir)
    return results


def _swap_into_place(staged: Path, out_dir: Path) -> None:
    """Rename `staged` to `out_dir`, replacing an earlier demo output there (checked by _check_demo_out)."""
    import os
    import shutil

    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staged, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_demo(cfg, out_dir: Path, keep: bool = False, json_out: bool = False) -> dict:
    """Run the demo's study in a work directory, then put the reader's files (DEMO_KEEPS; everything with
    `keep`) into `out_dir` by one rename. The work directory (bundles, profile) is removed in any case:
    with `keep` it is the staged output itself, beside `out_dir` so the final rename stays on one disk."""
    import json
    import shutil
    import tempfile

    from hotcold.model.registry import home

    out_dir = Path(out_dir)
    _check_demo_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage_parent = out_dir.resolve().parent
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.work-", dir=stage_parent) if keep
                else tempfile.mkdtemp(prefix="hotcold-demo-"))
    staged = None
    try:
        if not json_out:
            err.print(f"[dim]work directory (bundles, profile): {work} — "
                      + ("kept in --out at the end" if keep else "removed at the end (--keep keeps them)") + "[/]")
        cfg.out = work
        results = _execute(cfg, json_out)
        work_bytes = _dir_bytes(work)
        if keep:
            staged = work
        else:
            staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staged-", dir=stage_parent))
            for name in DEMO_KEEPS:
                src = work / name
                if src.is_dir():
                    shutil.copytree(src, staged / name)
                elif src.is_file():
                    shutil.copy2(src, staged / name)
        results = _relocate(results, work, out_dir, keep)
        results["demo"] = {"work_dir": str(work), "work_bytes": work_bytes, "work_removed": not keep,
                           "model_cache": str(home())}
        (staged / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        _swap_into_place(staged, out_dir)
        staged = None
    finally:
        if staged is not None and staged != work:
            shutil.rmtree(staged, ignore_errors=True)
        if work.exists() and not (keep and out_dir.exists() and work == out_dir):
            shutil.rmtree(work, ignore_errors=True)
    kept = _dir_bytes(out_dir)
    results["demo"]["out_bytes"] = kept
    if json_out:
        print_json(results)
        return results
    _print_table(results)
    n_pl = len(list((out_dir / "placements").iterdir())) if (out_dir / "placements").is_dir() else 0
    out.print(f"\nwrote {out_dir}/ ({_mib(kept)}): report.html (open it in a browser), report.md with pareto.png "
              f"and tau_per_layer.png, results.json and results.csv (every number above), placements/ ({n_pl} "
              f"placements)" + (", bundles/ and profile/" if keep else ""))
    if not keep:
        out.print(f"removed {work} ({_mib(work_bytes)}: the {len(results['runs'])} bundles and the profile); "
                  "pass --keep to keep them in --out")
    out.print(f"the model stays cached in {home()} for the next run (HOTCOLD_HOME moves it)")
    return results


def demo_cmd(
    mbpp: Annotated[str, typer.Option("--mbpp", help="Path to MBPP's mbpp.jsonl (default: $HOTCOLD_MBPP or ../shared/data; else the embedded prompts).")] = "",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its report, plots, results and placements.")] = Path("hotcold-demo"),
    keep: Annotated[bool, typer.Option("--keep", help="Also keep the bundles and the profile (~3 GB) in --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """The whole idea in a few minutes on a laptop: SmolLM2-135M profiled, placed (fixed vs adaptive) at
    three GPU budgets, exported, run, and compared with the dense model.

    Bundles are built in a temporary directory and removed at the end (--keep keeps them). On a CUDA
    machine the GPU side runs on the GPU.

    Example: hotcold demo
    """
    import torch

    from hotcold.errors import InputError
    from hotcold.workloads import find_mbpp

    _check_demo_out(Path(out_dir))
    path = Path(mbpp) if mbpp else find_mbpp()
    if mbpp and not path.is_file():
        raise InputError(f"--mbpp {mbpp} does not exist", "pass the path of mbpp.jsonl, or omit --mbpp to use the embedded prompts")
    if path and not path.is_file():
        raise InputError(f"$HOTCOLD_MBPP={path} does not exist", "point it at mbpp.jsonl, or unset it to use the embedded prompts")
    if path:
        err.print(f"[dim]workload: MBPP at {path} (profile: train split, evaluate: test split)[/]")
    else:
        err.print("[dim]workload: hotcold's embedded Python tasks, profile: train split (25-48), evaluate: test "
                  "split (1-24) (no MBPP found; pass --mbpp PATH to use it)[/]")
    cuda = torch.cuda.is_available()
    err.print("[dim]device: " + ("CUDA: the GPU side runs on the GPU, cost model calibrated on this machine[/]" if cuda
                                 else "CPU only: both sides run here; the cost model predicts pc-high (a desktop GPU + CPU)[/]"))
    run_demo(demo_config(path, cuda), out_dir, keep=keep, json_out=json_out)


def register(app: typer.Typer) -> None:
    app.command("study")(command(study_cmd))
    app.command("demo")(command(demo_cmd))
