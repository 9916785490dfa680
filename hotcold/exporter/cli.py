"""`hotcold export` (model + Placement -> Bundle) and `hotcold compile` (profile -> solve -> export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hotcold.clikit import JsonOpt, ModelOpt, OutDirOpt, command, err, out, print_json, progress

DTYPE_HELP = ("Weight dtype of the bundle: fp32, bf16, fp16, or group-wise quantized q4 / q8 (asymmetric q4a / q8a, "
              "group suffix e.g. q4_g64; docs/quantized.md): matrices quantized, embedding fp16, bundled CPU layout.")
DtypeOpt = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]
RuleOpt = Annotated[str, typer.Option("--rule", help="Activation rule of threshold/predictor modes: product "
                                                     "(|act(gate)·up| > t_l, the profiler's magnitude) or gate "
                                                     "(|act(gate)| > t_l, CATS; needs profile samples).")]
SparsityOpt = Annotated[float, typer.Option("--sparsity", min=0.0, max=0.999,
                                            help="Target fraction of inactive neurons per layer; t_l calibrated "
                                                 "from the profile.")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", min=0.0,
                                                    help="One absolute t_l for every layer (instead of --sparsity).")]
PredictorsOpt = Annotated[bool, typer.Option("--predictors", help="Train, export (ONNX) and check per-layer predictors.")]
RecallOpt = Annotated[float, typer.Option("--target-recall", min=0.5, max=0.999, help="Predictors: recall to size them for.")]
EpochsOpt = Annotated[int, typer.Option("--predictor-epochs", min=1, help="Predictors: training epochs.")]
RanksOpt = Annotated[str, typer.Option("--predictor-ranks", help="Predictors: candidate ranks, e.g. 36,72,144 "
                                                                 "(default dim/16, dim/8, dim/4).")]


def _ranks(text: str) -> tuple[int, ...]:
    from hotcold.errors import InputError

    if not text:
        return ()
    try:
        ranks = tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise InputError(f"--predictor-ranks {text!r} is not a list of integers", "pass e.g. 36,72,144") from None
    if any(r < 1 for r in ranks):
        raise InputError("predictor ranks must be >= 1", "pass e.g. 36,72,144")
    return ranks


LayoutOpt = Annotated[str, typer.Option("--cpu-layout", help="Cold rows on the CPU: auto (the rule's: split for "
                                                              "product, bundled for gate), bundled (gate matrix + one "
                                                              "\\[up | down] row per neuron) or split (transposed gate+up "
                                                              "matrix + down rows).")]


def _options(dtype: str, rule: str, sparsity: float, threshold: float | None, predictors: bool, target_recall: float,
             epochs: int, ranks: str, ctx_len: int | None, cpu_layout: str = "auto"):
    from hotcold.exporter.export import ExportOptions
    from hotcold.exporter.predictors import PredictorOptions
    from hotcold.memory import canonical_dtype

    return ExportOptions(dtype=canonical_dtype(dtype), rule=rule, cpu_layout=cpu_layout,
                         sparsity=None if threshold is not None else sparsity,
                         threshold=threshold, predictors=predictors, ctx_len=ctx_len,
                         predictor=PredictorOptions(target_recall=target_recall, epochs=epochs, ranks=_ranks(ranks))
                         if predictors else None)


def _print_result(res, json_out: bool) -> None:
    m = res.manifest
    info = {"bundle": str(res.path), "seconds": round(res.seconds, 2), "dtype": m["dtype"],
            "model": m["model"]["source"], "n_hot": m["placement"]["n_hot"],
            "gpu_bytes": m["memory"]["gpu_total"], "cpu_bytes": m["memory"]["cpu_total"],
            "activation": m["activation"], "files": {f["path"]: f["bytes"] for f in m["files"]},
            "predictors": None if not m["predictors"] else
            [{k: r[k] for k in ("layer", "rank", "decision_threshold", "heldout", "heldout_source")} |
             {"onnx_max_abs_diff": r["onnx_check"]["max_abs_diff"]} for r in m["predictors"]["report"]]}
    if json_out:
        print_json(info)
        return
    from hotcold.memory import format_bytes

    out.print(f"wrote {res.path} in {res.seconds:.1f} s: GPU part {format_bytes(info['gpu_bytes'])}, CPU part "
              f"{format_bytes(info['cpu_bytes'])}, {sum(info['n_hot'])} hot neurons of "
              f"{len(info['n_hot']) * m['model']['config']['n_ff']}")
    if info["predictors"]:
        from rich.table import Table

        t = Table(title="predictors (held-out)")
        for c in ("layer", "rank", "recall", "precision", "selected", "active", "onnx |Δ|"):
            t.add_column(c, justify="right")
        for r in info["predictors"]:
            h = r["heldout"]
            t.add_row(str(r["layer"]), str(r["rank"]), f"{h['recall']:.3f}", f"{h['precision']:.3f}",
                      f"{h['selected_fraction']:.3f}", f"{h['active_fraction']:.3f}", f"{r['onnx_max_abs_diff']:.2g}")
        out.print(t)
        out.print(f"held-out data: {info['predictors'][0]['heldout_source']}")
    out.print(f"next: hotcold run {res.path} --prompt \"...\"")


def export_cmd(
    placement: Annotated[Path, typer.Option("--placement", help="Placement directory from `hotcold solve`.")],
    out_dir: OutDirOpt,
    model: ModelOpt = "smollm2-135m",
    profile: Annotated[Path | None, typer.Option("--profile", help="Profile to calibrate t_l (and train predictors) on.")] = None,
    heldout_profile: Annotated[Path | None, typer.Option("--heldout-profile", help="Profile of other prompts to "
                                                                                  "measure predictor recall on.")] = None,
    dtype: DtypeOpt = "fp32",
    rule: RuleOpt = "product",
    cpu_layout: LayoutOpt = "auto",
    sparsity: SparsityOpt = 0.5,
    threshold: ThresholdOpt = None,
    predictors: PredictorsOpt = False,
    target_recall: RecallOpt = 0.9,
    predictor_epochs: EpochsOpt = 30,
    predictor_ranks: RanksOpt = "",
    ctx_len: Annotated[int | None, typer.Option("--ctx-len", min=1, help="Context the memory account is sized "
                                                                         "for (default: the placement's).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a Bundle: hot neurons (permuted hot-first) with attention for the GPU side, cold neurons row-bundled
    for the CPU worker, index maps, thresholds, tokenizer, optional ONNX predictors, sha256 of every file.

    Examples:

      hotcold export -m smollm2-135m --placement place/ --profile prof/ -o bundle/

      hotcold export -m smollm2-135m --placement place/ --profile prof/ --predictors --heldout-profile val/ -o bundle/
    """
    from hotcold.exporter.export import export_bundle
    from hotcold.model.registry import load_source
    from hotcold.profiler.artifact import Profile
    from hotcold.solver.placement import Placement

    opts = _options(dtype, rule, sparsity, threshold, predictors, target_recall, predictor_epochs, predictor_ranks,
                    ctx_len, cpu_layout)
    pl = Placement.load(placement)
    if pl.manifest.get("dtype") and pl.manifest["dtype"] != opts.dtype:
        err.print(f"[yellow]note: the placement was solved for {pl.manifest['dtype']} weights "
                  f"({pl.manifest['memory']['gpu_total'] / 2**20:.0f} MiB of GPU); this bundle is {opts.dtype}, so its "
                  f"GPU part differs — pass --dtype {pl.manifest['dtype']} to match (or solve with --dtype {opts.dtype})[/]")
    need_samples = predictors or (rule == "gate" and threshold is None)
    prof = Profile.load(profile, with_samples=need_samples) if profile is not None else None
    held = Profile.load(heldout_profile, with_samples=True) if heldout_profile is not None else None
    src = load_source(model)
    with progress(disable=json_out) as p:
        task = p.add_task("export", total=src.config.n_layers, info="")
        res = export_bundle(src, pl, out_dir, profile=prof, options=opts, heldout=held,
                            log=lambda s: err.print(f"[dim]{s}[/]"),
                            progress=lambda i, n: p.update(task, completed=i, info=f"layer {i}/{n}"))
    _print_result(res, json_out)


def register(app: typer.Typer) -> None:
    app.command("export")(command(export_cmd))
    from hotcold.exporter.compile import register_compile

    register_compile(app)
