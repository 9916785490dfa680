"""`hotcold profile run | merge | import-powerinfer | synth | show`: a thin shell over hotcold.profiler.

Nothing heavy is imported at module level: torch, numpy and matplotlib load inside the commands.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hotcold.clikit import DeviceOpt, JsonOpt, ModelOpt, OutDirOpt, SeedOpt, command, err, escape, out, print_json, progress

RUN_HELP = """Profile which FFN neurons fire on a workload and write a Profile directory.

Examples:

  hotcold profile run -m smollm2-135m --dataset mbpp --split test --limit 100 -o prof/

  hotcold profile run -m smollm2-135m --dataset embedded --mode teacher-forced --stream -o prof-tf/

  hotcold profile run -m model.gguf --activation magnitude --threshold 0.02 --samples 2048 -o prof/

  torchrun --nproc-per-node 2 -m hotcold profile run -m smollm2-135m --dataset mbpp -o prof/

Interrupted runs resume: a checkpoint is written every --checkpoint-every prompts beside --out, and the
same command continues from it.
"""

MERGE_HELP = """Sum profiles of the same model and activation definition into one.

Example:  hotcold profile merge part-0/ part-1/ --out prof/
"""

IMPORT_HELP = """Convert PowerInfer's activation_{i}.pt files (one per layer, integer order) into a Profile.

Example:  hotcold profile import-powerinfer ReluLLaMA-7B/activation -m relu-llama.gguf --tokens 1000000 -o prof/
"""

SYNTH_HELP = """Write a synthetic profile (power-law neuron frequencies) for what-if planning.

Per layer: f_r = min(1, c * r^-skew) over neuron rank r, scaled to mean --density, neurons randomly
permuted, counts drawn binomially. --skew and --density take one value, A:B (linear from the first
layer to the last) or one value per layer, comma-separated.

Examples:

  hotcold profile synth --shape llama-70b -o synth70b/

  hotcold profile synth --shape llama-70b --skew 0.6:1.4 --density 0.2:0.05 --seed 3 -o synth70b/
"""

SHOW_HELP = """Summarise a profile: per-layer sparsity, neurons covering 80% of activations, Gini.

Examples:  hotcold profile show prof/        hotcold profile show prof/ --plot freq.png --phase all
"""


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Profile FFN neuron activations (run, merge, import-powerinfer, synth, show).",
                        no_args_is_help=True, rich_markup_mode="rich")
    group.command("run", help=RUN_HELP)(run_cmd)
    group.command("merge", help=MERGE_HELP)(merge_cmd)
    group.command("import-powerinfer", help=IMPORT_HELP)(import_cmd)
    group.command("synth", help=SYNTH_HELP)(synth_cmd)
    group.command("show", help=SHOW_HELP)(show_cmd)
    app.add_typer(group, name="profile")


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


@command
def run_cmd(
    out_dir: OutDirOpt,
    model: ModelOpt = "smollm2-135m",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="mbpp, mbpp:PATH, jsonl:PATH, txt:PATH or embedded.")] = "mbpp",
    split: Annotated[Optional[str], typer.Option("--split", help="MBPP: prompt, test, validation, train or all (default test).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Profile at most N prompts of the split.")] = None,
    offset: Annotated[int, typer.Option("--offset", help="Skip the first K prompts of the split.")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on a malformed dataset line instead of skipping it.")] = False,
    mode: Annotated[str, typer.Option("--mode", help="generate (prompt + greedy decoding) or teacher-forced (prompt + reference code).")] = "generate",
    activation: Annotated[Optional[str], typer.Option("--activation", "-a", help="magnitude (|a| > t_l), gate (W_gate x > 0) or relu (a != 0). Default: relu for ReLU models, else magnitude.")] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="magnitude: calibrate t_l per layer so this fraction of |a| falls below it (default 0.5).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="magnitude: one absolute t for every layer.")] = None,
    thresholds_from: Annotated[Optional[Path], typer.Option("--thresholds-from", help="magnitude: take t_l from this profile of the same model (its thresholds, or with --sparsity derived from its histograms), so separate runs merge.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="generate: tokens to decode per prompt.")] = 64,
    stream: Annotated[bool, typer.Option("--stream", help="teacher-forced: layer by layer, one layer's weights resident (models larger than memory).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="teacher-forced: sequences per forward.")] = 8,
    prompt_format: Annotated[str, typer.Option("--prompt-format", help="chat (the model's chat template) or raw.")] = "chat",
    calibration_prompts: Annotated[Optional[int], typer.Option("--calibration-prompts", help="--sparsity: the first N prompts' |a| histograms set t_l (default 4 in generate mode, 16 teacher-forced).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Keep this many (x, mask) token samples for predictor training (each costs n_layers x (2 dim + n_ff) bytes).")] = 0,
    seed: SeedOpt = 0,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Write a checkpoint every K prompts (default 16; --stream: one pass, no checkpoint).")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Where checkpoints go (default: .OUT.checkpoint beside --out).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from a checkpoint of the same run, or discard it.")] = True,
    device: DeviceOpt = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar on stderr.")] = True,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.model.registry import load_source
    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.engine import ProfileOptions, default_checkpoint_dir, run_profile
    from hotcold.workloads import load_dataset

    ds = load_dataset(dataset, split, limit=limit, offset=offset, strict=strict)
    if ds.stats.skipped and _is_main_rank():
        err.print(f"[yellow]skipped {ds.stats.skipped} malformed line(s) in {escape(str(ds.stats.path))} "
                  f"(first: {escape(ds.stats.errors[0])}); --strict fails instead[/]")
    src = load_source(model)
    kind = activation or ("relu" if src.config.activation == "relu" else "magnitude")
    thresholds = None
    if thresholds_from is not None:
        thresholds = _thresholds_from(thresholds_from, src.fingerprint, sparsity)
    spec = ActivationSpec(kind=kind, threshold=threshold, sparsity=sparsity, thresholds=thresholds)
    opts = ProfileOptions(mode=mode, activation=spec, max_new_tokens=max_new_tokens, stream=stream,
                          batch_size=batch_size, prompt_format=prompt_format,
                          calibration_prompts=calibration_prompts, samples=samples, seed=seed,
                          checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, resume=resume,
                          device=device, dtype=dtype)
    main = _is_main_rank()
    ckdir = checkpoint_dir or default_checkpoint_dir(out_dir)
    t0 = time.perf_counter()
    with progress(disable=not (show_progress and main)) as bar:
        task = bar.add_task("profiling", total=None, info="")
        first: list[float] = []

        def on_progress(done: float, total: int, tokens: int) -> None:
            now = time.perf_counter()
            if not first:
                first.extend([now, tokens])
            dt = now - first[0]
            rate = (tokens - first[1]) / dt if dt > 0 else 0.0
            bar.update(task, completed=done, total=total, info=f"{tokens} tok  {rate:,.0f} tok/s")

        try:
            res = run_profile(src, ds, opts, out=out_dir, progress=on_progress)
        except KeyboardInterrupt:
            bar.stop()
            err.print(f"[bold red]interrupted — no profile was written; progress up to the last checkpoint is in "
                      f"{escape(str(ckdir))}: re-run the same command to resume[/]")
            raise typer.Exit(code=130) from None
    if not main:
        return
    p = res.profile
    from hotcold.profiler.stats import summary

    s = summary(p)
    result = {"out": str(res.path), "model": p.manifest["model"]["source"], "mode": mode, "prompts": len(ds),
              "token_count": p.token_count, "activation": p.manifest["activation"],
              "mean_sparsity": s["mean_sparsity"], "phase": s["phase"], "samples": s["samples"],
              "resumed_from_prompt": res.resumed_from, "world_size": res.world,
              "elapsed_s": round(time.perf_counter() - t0, 3), "calibration_s": round(res.calibration_s, 3)}
    if json_out:
        print_json(result)
        return
    tc = p.token_count
    resumed = f", resumed after {res.resumed_from} prompts" if res.resumed_from else ""
    ms = "n/a" if s["mean_sparsity"] is None else f"{s['mean_sparsity']:.1%}"
    out.print(f"wrote {res.path}: {len(ds)} prompts, {tc['prefill']} prefill + {tc['decode']} decode tokens, "
              f"{p.manifest['activation']['kind']} activation, mean {s['phase']} sparsity {ms}{resumed}")
    out.print(f"next: hotcold profile show {res.path}")


def _thresholds_from(path: Path, fingerprint: str, sparsity: float | None) -> tuple[float, ...]:
    from hotcold.errors import IncompatibleError, InputError
    from hotcold.profiler.artifact import Profile

    ref = Profile.load(path)
    if ref.fingerprint != fingerprint:
        raise IncompatibleError(f"--thresholds-from {path} is a profile of another model "
                                f"({ref.manifest['model'].get('source')})", "use a profile of the model you profile")
    if sparsity is not None:
        return tuple(ref.magnitude_thresholds(sparsity))
    t = ref.manifest["activation"].get("thresholds")
    if ref.manifest["activation"].get("kind") != "magnitude" or not t:
        raise InputError(f"--thresholds-from {path}: that profile has no magnitude thresholds",
                         "add --sparsity S to derive them from its histograms")
    return tuple(float(v) for v in t)


@command
def merge_cmd(
    profiles: Annotated[list[Path], typer.Argument(help="Profile directories to sum.")],
    out_dir: OutDirOpt,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.errors import InputError
    from hotcold.profiler.artifact import Profile, merge

    if len(profiles) < 2:
        raise InputError("merge needs at least two profiles", "pass two or more profile directories")
    loaded = [Profile.load(p, with_samples=True) for p in profiles]
    merged = merge(loaded)
    path = merged.save(out_dir)
    tc = merged.token_count
    if json_out:
        print_json({"out": str(path), "parts": [str(p) for p in profiles], "token_count": tc})
    else:
        out.print(f"merged {len(profiles)} profiles into {path}: {tc['prefill']} prefill + {tc['decode']} decode tokens")


@command
def import_cmd(
    directory: Annotated[Path, typer.Argument(help="Directory holding activation_0.pt, activation_1.pt, ...")],
    out_dir: OutDirOpt,
    model: ModelOpt = "smollm2-135m",
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Tokens PowerInfer profiled (its files do not say); omit if unknown.")] = None,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.model.registry import load_source
    from hotcold.profiler.powerinfer import import_powerinfer

    p = import_powerinfer(directory, load_source(model), tokens)
    path = p.save(out_dir)
    if json_out:
        print_json({"out": str(path), "layers": p.n_layers, "n_ff": p.n_ff, "token_count": p.token_count})
    else:
        known = f"{tokens} tokens" if tokens else "token count unknown (frequencies normalised by the largest count)"
        out.print(f"imported {p.n_layers} layers x {p.n_ff} neurons into {path}; {known}")


@command
def synth_cmd(
    out_dir: OutDirOpt,
    shape: Annotated[Optional[str], typer.Option("--shape", help="A named shape: llama-70b, llama3-70b, smollm2-135m, tiny.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Take shape and fingerprint from this model instead of --shape.")] = None,
    skew: Annotated[str, typer.Option("--skew", help="Power-law exponent: one value, A:B (linear over layers) or one per layer.")] = "1.0",
    density: Annotated[str, typer.Option("--density", help="Mean fraction of neurons active per token: one value, A:B or one per layer.")] = "0.1",
    prefill_tokens: Annotated[int, typer.Option("--prefill-tokens", help="Synthetic prefill tokens counted.")] = 50_000,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Synthetic decode tokens counted.")] = 50_000,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.errors import InputError
    from hotcold.model.config import shape as named_shape
    from hotcold.profiler.synth import synth_profile

    if (shape is None) == (model is None):
        raise InputError("synth needs exactly one of --shape and --model", "e.g. --shape llama-70b")
    t0 = time.perf_counter()
    source = None
    if model is not None:
        from hotcold.model.registry import load_source

        source = load_source(model)
        cfg = source.config
    else:
        cfg = named_shape(shape)
    p = synth_profile(cfg, skew, seed, density=density, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                      source=source)
    path = p.save(out_dir)
    dt = time.perf_counter() - t0
    if json_out:
        print_json({"out": str(path), "model": p.manifest["model"]["source"], "layers": p.n_layers,
                    "n_ff": p.n_ff, "seconds": round(dt, 3), "synthetic": p.manifest["synthetic"]})
    else:
        out.print(f"wrote synthetic profile {path} ({p.n_layers} x {p.n_ff}, model {p.manifest['model']['source']}) "
                  f"in {dt:.1f} s")


@command
def show_cmd(
    profile: Annotated[Path, typer.Argument(help="Profile directory.")],
    phase: Annotated[str, typer.Option("--phase", help="decode (falls back to all when none), prefill or all.")] = "decode",
    share: Annotated[float, typer.Option("--share", help="Activation share for the covering-neurons column.")] = 0.8,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the frequency curves to this image (png, svg, pdf).")] = None,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.errors import InputError
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.stats import plot_frequencies, summary

    if not 0.0 < share <= 1.0:
        raise InputError(f"--share must be in (0, 1], got {share}", "pass e.g. 0.8")
    p = Profile.load(profile)
    s = summary(p, phase, share)
    if plot is not None:
        s["plot"] = str(plot_frequencies(p, plot, phase))
    if json_out:
        print_json(s)
        return
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    m = p.manifest
    ds = s["dataset"]
    where = ds.get("spec") or ds.get("name") or "?"
    if ds.get("split"):
        where += f" split {ds['split']}"
    act = m["activation"]
    ts = act.get("thresholds")
    act_s = act["kind"] + (f", t_l {min(ts):.3g}..{max(ts):.3g}" if ts else "") + \
        (f", target sparsity {act['target_sparsity']:.0%}" if act.get("target_sparsity") is not None else "")
    tc = p.token_count
    out.print(f"[bold]{escape(str(profile))}[/]  model {escape(str(s['model']['source']))} "
              f"({p.n_layers} layers x {p.n_ff} neurons)")
    out.print(f"dataset {escape(str(where))} ({ds.get('n_prompts')} prompts), mode {m.get('mode')}, activation {escape(act_s)}")
    out.print(f"tokens: {tc.get('prefill')} prefill, {tc.get('decode')} decode"
              + (" (unknown: frequencies normalised by the largest count)" if tc.get("unknown") else "")
              + (f"; {s['samples']} (x, mask) samples" if s["samples"] else ""))
    table = Table(title=f"per layer ({s['phase']} tokens)", show_edge=False, pad_edge=False)
    for col in ("layer", "active", "sparsity", f"neurons for {share:.0%}", "share of n_ff", "Gini", "max f"):
        table.add_column(col, justify="right")
    for r in s["layers"]:
        table.add_row(str(r["layer"]), pct(r["active"]), pct(r["sparsity"]), str(r["cover_neurons"]),
                      pct(r["cover_fraction"]), f"{r['gini']:.3f}", pct(r["max_frequency"]))
    out.print(table)
    out.print(f"mean sparsity {pct(s['mean_sparsity'])}; {pct(s['cover_fraction'])} of all neurons cover "
              f"{share:.0%} of activations")
    if plot is not None:
        out.print(f"plot: {s['plot']}")
