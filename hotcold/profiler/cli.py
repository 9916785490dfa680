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
from hotcold.profiler.activation import kind_of

RUN_HELP = """Profile which FFN neurons fire on a workload and write a Profile directory.

Examples:

  hotcold profile run -m smollm2-135m --dataset mbpp --split test --limit 100 -o prof/

  hotcold profile run -m smollm2-135m --dataset embedded --mode teacher-forced --stream -o prof-tf/

  hotcold profile run -m model.gguf --activation product --threshold 0.02 --samples 2048 -o prof/

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

SHOW_HELP = """Summarise a profile: per-layer sparsity, neurons covering 80% of activations, Gini, the coverage
curve (share of activations caught by the top x% of neurons) and the top set's stability: across halves
of the prompts (profiles made with --per-sequence) and against another workload's profile (--against).

Examples:  hotcold profile show prof/        hotcold profile show prof/ --plot freq.png --phase all

           hotcold profile show mbpp-prof/ --against humaneval-prof/
"""


HOTSETS_HELP = """How much of a held-out workload's activations a GPU share of neurons catches, per way of choosing them.

For GPU shares of the neurons (--shares), the share of the evaluation's continuation activations on the
GPU when the hot set is the profile's top set, the solver's fixed or adaptive placement, the runtime's
dynamic EMA replayed over the evaluation, the prompt's own top set, an oracle, or random; per layer and
overall, as a table, JSON, a plot and report.md in --out.

--eval is a profile made with --per-sequence, or a dataset (mbpp, mbpp:PATH, embedded, jsonl:PATH) that
is profiled here with the profile's own activation thresholds (teacher-forced by default).

Examples:

  hotcold profile run -m qwen2.5-coder-0.5b --dataset mbpp --split train --limit 64 --mode teacher-forced -o prof/

  hotcold profile hotsets prof/ --eval mbpp --eval-split test --eval-limit 64 --save-eval eval/ -o hot/

  hotcold profile hotsets prof/ --eval eval/ --shares 0.1,0.2,0.3 --json
"""


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Profile FFN neuron activations (run, merge, import-powerinfer, synth, show).",
                        no_args_is_help=True, rich_markup_mode="rich")
    group.command("run", help=RUN_HELP)(run_cmd)
    group.command("merge", help=MERGE_HELP)(merge_cmd)
    group.command("import-powerinfer", help=IMPORT_HELP)(import_cmd)
    group.command("synth", help=SYNTH_HELP)(synth_cmd)
    group.command("show", help=SHOW_HELP)(show_cmd)
    group.command("hotsets", help=HOTSETS_HELP)(hotsets_cmd)
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
    activation: Annotated[Optional[str], typer.Option("--activation", "-a", help="product (|act(gate)·up| > t_l), sign (W_gate x > 0) or relu (a != 0). Default: relu for ReLU models, else product.")] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="product: calibrate t_l per layer so this fraction of |a| falls below it (default 0.5).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="product: one absolute t for every layer.")] = None,
    thresholds_from: Annotated[Optional[Path], typer.Option("--thresholds-from", help="product: take t_l from this profile of the same model (its thresholds, or with --sparsity derived from its histograms), so separate runs merge.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="generate: tokens to decode per prompt.")] = 64,
    stream: Annotated[bool, typer.Option("--stream", help="teacher-forced: layer by layer, one layer's weights resident (models larger than memory).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="teacher-forced: sequences per forward.")] = 8,
    prompt_format: Annotated[str, typer.Option("--prompt-format", help="chat (the model's chat template) or raw.")] = "chat",
    calibration_prompts: Annotated[Optional[int], typer.Option("--calibration-prompts", help="--sparsity: the first N prompts' |a| histograms set t_l (default 4 in generate mode, 16 teacher-forced).")] = None,
    per_sequence: Annotated[bool, typer.Option("--per-sequence", help="Also keep each prompt's counts (prompt, and the continuation in blocks), for `profile hotsets` and the halves in `profile show`.")] = False,
    per_sequence_block: Annotated[int, typer.Option("--per-sequence-block", help="--per-sequence: continuation tokens per block (16: the dynamic mode's EMA period).")] = 16,
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
    kind = activation or ("relu" if src.config.activation == "relu" else "product")
    thresholds = None
    if thresholds_from is not None:
        thresholds = _thresholds_from(thresholds_from, src.fingerprint, sparsity)
    spec = ActivationSpec(kind=kind, threshold=threshold, sparsity=sparsity, thresholds=thresholds)
    opts = ProfileOptions(mode=mode, activation=spec, max_new_tokens=max_new_tokens, stream=stream,
                          batch_size=batch_size, prompt_format=prompt_format,
                          calibration_prompts=calibration_prompts, samples=samples, seed=seed,
                          checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, resume=resume,
                          device=device, dtype=dtype, per_sequence=per_sequence,
                          per_sequence_block=per_sequence_block)
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
    if kind_of(ref.manifest["activation"]) != "product" or not t:
        raise InputError(f"--thresholds-from {path}: that profile has no product-rule thresholds",
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
    against: Annotated[Optional[Path], typer.Option("--against", help="Another workload's profile of the same model: how much of its activations this profile's top 20% catches.")] = None,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.errors import InputError
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.stats import plot_frequencies, summary

    if not 0.0 < share <= 1.0:
        raise InputError(f"--share must be in (0, 1], got {share}", "pass e.g. 0.8")
    p = Profile.load(profile, with_sequences=True)
    s = summary(p, phase, share, Profile.load(against) if against is not None else None)
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
    act_s = kind_of(act) + (f", t_l {min(ts):.3g}..{max(ts):.3g}" if ts else "") + \
        (f", target sparsity {act['target_sparsity']:.0%}" if act.get("target_sparsity") is not None else "")
    tc = p.token_count
    out.print(f"[bold]{escape(str(profile))}[/]  model {escape(str(s['model']['source']))} "
              f"({p.n_layers} layers x {p.n_ff} neurons)")
    out.print(f"dataset {escape(str(where))} ({ds.get('n_prompts')} prompts), mode {m.get('mode')}, activation {escape(act_s)}")
    out.print(f"tokens: {tc.get('prefill')} prefill, {tc.get('decode')} decode"
              + (" (unknown: frequencies normalised by the largest count)" if tc.get("unknown") else "")
              + (f"; {s['samples']} (x, mask) samples" if s["samples"] else ""))
    table = Table(title=f"per layer ({s['phase']} tokens)", show_edge=False, pad_edge=False)
    st = s["stability"]
    frac = st["fraction"]
    halves, vs = st["halves"], st["against"]
    cols = ["layer", "active", "sparsity", f"neurons for {share:.0%}", "share of n_ff", "Gini",
            f"top {frac:.0%} catch", "min f", "max f"]
    cols += ["halves: catch / own"] if halves else []
    cols += ["against: catch / own"] if vs else []
    for col in cols:
        table.add_column(col, justify="right")
    for r in s["layers"]:
        row = [str(r["layer"]), pct(r["active"]), pct(r["sparsity"]), str(r["cover_neurons"]),
               pct(r["cover_fraction"]), f"{r['gini']:.3f}", pct(r["coverage"][str(frac)]),
               pct(r["min_frequency"]), pct(r["max_frequency"])]
        row += [pct(halves["relative_catch"][r["layer"]])] if halves else []
        row += [pct(vs["relative_catch"][r["layer"]])] if vs else []
        table.add_row(*row)
    out.print(table)
    out.print(f"mean sparsity {pct(s['mean_sparsity'])}; {pct(s['cover_fraction'])} of all neurons cover "
              f"{share:.0%} of activations; Gini {s['gini_range'][0]:.3f}..{s['gini_range'][1]:.3f}")
    out.print("coverage curve (every layer's top x% of neurons): "
              + ", ".join(f"top {float(x):.0%} -> {pct(v)}" for x, v in s["coverage"].items()))
    if halves:
        out.print(f"stability across halves ({halves['sequences'][0]} + {halves['sequences'][1]} prompts): one half's "
                  f"top {frac:.0%} catches {pct(halves['relative_catch_mean'])} of what the other half's own top "
                  f"{frac:.0%} catches (mean over layers)")
    else:
        out.print("stability across halves: n/a (made without --per-sequence)")
    if vs:
        out.print(f"against {escape(str(against))}: this profile's top {frac:.0%} catches {pct(vs['catch'])} of its "
                  f"activations, {pct(vs['relative_catch_mean'])} of what its own top {frac:.0%} catches")
    if plot is not None:
        out.print(f"plot: {s['plot']}")


def _parse_shares(text: str) -> tuple[float, ...]:
    from hotcold.errors import InputError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--shares {text!r} is not a comma list of fractions", "write e.g. 0.05,0.1,0.2") from None


@command
def hotsets_cmd(
    profile: Annotated[Path, typer.Argument(help="Profile directory (the offline statistics).")],
    eval_: Annotated[str, typer.Option("--eval", help="A profile made with --per-sequence, or a dataset to profile here: mbpp, mbpp:PATH, embedded, jsonl:PATH.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write hotsets.json, hotsets.png and report.md into this directory.")] = None,
    eval_split: Annotated[Optional[str], typer.Option("--eval-split", help="Dataset --eval: the split (MBPP: test by default).")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Dataset --eval: at most N prompts.")] = None,
    eval_offset: Annotated[int, typer.Option("--eval-offset", help="Dataset --eval: skip the first K prompts.")] = 0,
    eval_mode: Annotated[str, typer.Option("--eval-mode", help="Dataset --eval: teacher-forced (reference code) or generate.")] = "teacher-forced",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Dataset --eval, generate mode: tokens per prompt.")] = 128,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Dataset --eval: the model (default: the profile's source).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Dataset --eval, teacher-forced: sequences per forward.")] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="Dataset --eval: compute dtype (float32, bfloat16, float16).")] = "float32",
    save_eval: Annotated[Optional[Path], typer.Option("--save-eval", help="Dataset --eval: keep the evaluation profile here.")] = None,
    shares: Annotated[str, typer.Option("--shares", help="GPU shares of the FFN neurons, comma-separated.")] = "0.05,0.1,0.2,0.3,0.4,0.5,0.6",
    hardware: Annotated[str, typer.Option("--hardware", help="Cost model of the adaptive solver and the dynamic rule: a preset or a spec JSON.")] = "pc-high",
    phase: Annotated[str, typer.Option("--phase", help="The profile's frequencies that rank neurons: decode, prefill or all.")] = "decode",
    warmup: Annotated[int, typer.Option("--warmup", help="Dynamic: also report the share caught after this many continuation tokens.")] = 256,
    layer_share: Annotated[float, typer.Option("--layer-share", help="GPU share of the per-layer table and plot.")] = 0.2,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress on stderr.")] = True,
    json_out: JsonOpt = False,
) -> None:
    from hotcold.errors import IncompatibleError
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.hotsets import HotsetOptions, LABELS, measure_hotsets, write_report

    opts = HotsetOptions(shares=_parse_shares(shares), phase=phase, hardware=hardware, warmup=warmup)
    opts.validate()
    prof = Profile.load(profile)
    ev_path = Path(eval_)
    with progress(disable=not show_progress) as bar:
        if (ev_path / "manifest.json").is_file():
            ev = Profile.load(ev_path, with_sequences=True)
        else:
            from hotcold.model.registry import load_source
            from hotcold.profiler.activation import ActivationSpec
            from hotcold.profiler.engine import ProfileOptions, run_profile
            from hotcold.workloads import load_dataset

            ds = load_dataset(eval_, eval_split, limit=eval_limit, offset=eval_offset)
            name = model or prof.manifest["model"].get("source")
            src = load_source(name)
            if src.fingerprint != prof.fingerprint:
                raise IncompatibleError(f"{'--model ' if model else 'the profile source '}{name} is not the model "
                                        f"{profile} was profiled on (fingerprints differ)",
                                        "pass --model with the model the profile was made from")
            act = prof.manifest["activation"]
            ts = act.get("thresholds")
            spec = ActivationSpec(kind=kind_of(act), thresholds=tuple(ts)) if kind_of(act) == "product" and ts \
                else ActivationSpec(kind=kind_of(act))
            task = bar.add_task("profiling --eval", total=None, info="")
            popts = ProfileOptions(mode=eval_mode, activation=spec, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, dtype=dtype, per_sequence=True, resume=True)
            res = run_profile(src, ds, popts, out=save_eval,
                              progress=lambda d, t, n: bar.update(task, completed=d, total=t, info=f"{n} tok"))
            ev = res.profile
        task = bar.add_task("hot sets", total=len(opts.shares), info="")
        done = [0]

        def log(msg: str) -> None:
            if msg.startswith("share"):
                done[0] += 1
                bar.update(task, completed=done[0], info=msg.split(":")[0])
            elif show_progress:
                err.print(escape(msg))

        r = measure_hotsets(prof, ev, opts, log=log)
    if out_dir is not None:
        r["report"] = str(write_report(r, out_dir, layer_share))
    if json_out:
        print_json(r)
        return
    from rich.table import Table

    table = Table(title=f"share of held-out activations on the GPU ({r['continuation_tokens']} continuation tokens, "
                        f"{r['sequences']} sequences)", show_edge=False, pad_edge=False)
    table.add_column("choice")
    for s in r["shares"]:
        table.add_column(f"{s:.0%}", justify="right")
    for c in r["choices"]:
        table.add_row(LABELS.get(c, c), *(f"{v:.1%}" for v in r["overall"][c]))
    out.print(table)
    if out_dir is not None:
        out.print(f"report: {escape(str(out_dir / 'report.md'))}")
    if save_eval is not None and ev.path is not None:
        out.print(f"evaluation profile: {escape(str(ev.path))}")
