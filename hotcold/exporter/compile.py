"""`hotcold compile`: profile -> solve -> export in one command, with the intermediate artifacts kept next to
the bundle and reused when their inputs have not changed.

Layout, for `--out DIR/NAME`:
    DIR/NAME                  the Bundle
    DIR/NAME.parts/profile    the Profile
    DIR/NAME.parts/placement  the Placement
    DIR/NAME.parts/compile.json   for each stage: the hash of its inputs ("key") and of its output

A stage is reused when compile.json records the same key for it and its artifact still loads, verifies
(every file's sha256) and has the recorded content hash; otherwise it is re-run, and every later stage
with it (their keys include the earlier stage's content hash). So changing only the GPU budget re-solves
and re-exports without re-profiling, and changing only the export options re-exports only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from hotcold.artifacts import atomic_write_text, sha256_json
from hotcold.errors import HotcoldError

STAGES = ("profile", "placement", "bundle")


@dataclass(frozen=True)
class CompileOptions:
    dataset: str = "mbpp"
    split: str | None = None
    limit: int | None = 32
    offset: int = 0
    mode: str = "teacher-forced"  # profiling mode
    max_new_tokens: int = 64
    samples: int = 2048
    profile_sparsity: float | None = None  # the profile's magnitude activation (None: the profiler's default)
    prompt_format: str = "chat"
    preset: str | None = "pc-high"
    hardware: str | None = None  # spec file; wins over preset
    policy: str = "adaptive"
    gpu_budget: str | None = None
    cpu_budget: str | None = None
    tau: float | None = None
    cold_mode: str = "threshold"
    ctx_len: int | None = None
    time_limit: float = 60.0
    device: str = "cpu"  # where profiling runs (cpu | cuda | auto); not part of the profile's identity


@dataclass
class CompileResult:
    bundle: Path
    parts: Path
    reused: dict[str, bool] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    export_manifest: dict[str, Any] = field(default_factory=dict)
    placement_summary: dict[str, Any] = field(default_factory=dict)


def parts_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.parts"


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _reusable(state: dict[str, Any], stage: str, key: str, load: Callable[[], Any], content: Callable[[Any], str]):
    """The stage's artifact when compile.json has the same key for it and it loads with the recorded hash."""
    rec = state.get(stage)
    if not rec or rec.get("key") != key:
        return None
    try:
        obj = load()
    except HotcoldError:  # missing, altered or of another version: re-run the stage
        return None
    return obj if content(obj) == rec.get("content") else None


def compile_bundle(model: str, out: str | Path, options: CompileOptions | None = None, export_options: Any = None,
                   log: Callable[[str], None] = lambda s: None, progress: Any = None) -> CompileResult:
    """Profile `model` on the dataset, solve a placement, export the bundle to `out` (reusing what it can)."""
    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.registry import load_source
    from hotcold.profiler.activation import ActivationSpec
    from hotcold.profiler.artifact import Profile
    from hotcold.profiler.engine import ProfileOptions, profile_dataset
    from hotcold.bundle import Bundle
    from hotcold.solver.hardware import resolve
    from hotcold.solver.placement import Placement
    from hotcold.solver.solve import solve

    opts = options or CompileOptions()
    eopts = export_options or ExportOptions()
    from hotcold.memory import parse_bytes

    for what, v in (("GPU budget", opts.gpu_budget), ("CPU budget", opts.cpu_budget)):
        if v:  # a bad budget fails before the profile is computed
            parse_bytes(v, what)
    out = Path(out)
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    state_path = parts / "compile.json"
    state = _read_state(state_path)
    src = load_source(model)
    res = CompileResult(bundle=out, parts=parts)
    need_samples = eopts.predictors or (eopts.rule == "gate" and eopts.threshold is None)

    # ---- profile --------------------------------------------------------------------------------
    popts = ProfileOptions(mode=opts.mode, max_new_tokens=opts.max_new_tokens, prompt_format=opts.prompt_format,
                           samples=opts.samples, activation=ActivationSpec(sparsity=opts.profile_sparsity),
                           device=opts.device)
    pkey = sha256_json({"model": src.fingerprint, "dataset": opts.dataset, "split": opts.split, "limit": opts.limit,
                        "offset": opts.offset, "options": {k: str(v) for k, v in asdict(popts).items() if k != "device"}})
    ppath = parts / "profile"
    prof = _reusable(state, "profile", pkey, lambda: Profile.load(ppath, with_samples=need_samples),
                     lambda p: p.content_hash)
    res.reused["profile"] = prof is not None
    if prof is None:
        log(f"profiling {opts.dataset} ({opts.mode}) -> {ppath}")
        run = profile_dataset(src, opts.dataset, opts.split, limit=opts.limit, offset=opts.offset, opts=popts,
                              out=ppath, progress=progress)
        prof = Profile.load(ppath, with_samples=need_samples) if run.path is None else \
            Profile.load(run.path, with_samples=need_samples)
    else:
        log(f"profile: reusing {ppath}")
    state["profile"] = {"key": pkey, "content": prof.content_hash, "path": str(ppath)}
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")

    # ---- placement ------------------------------------------------------------------------------
    hw = resolve(path=opts.hardware) if opts.hardware else resolve(preset_name=opts.preset)
    skey = sha256_json({"profile": prof.content_hash, "hardware": hw.to_json(), "policy": opts.policy,
                        "gpu_budget": opts.gpu_budget, "cpu_budget": opts.cpu_budget, "tau": opts.tau,
                        "cold_mode": opts.cold_mode, "ctx_len": opts.ctx_len, "time_limit": opts.time_limit,
                        "dtype": eopts.dtype})
    spath = parts / "placement"
    pl = _reusable(state, "placement", skey, lambda: Placement.load(spath), lambda p: p.content_hash)
    res.reused["placement"] = pl is not None
    if pl is None:
        log(f"solving ({opts.policy}) -> {spath}")
        pl = solve(prof, hw, policy=opts.policy, gpu_budget=opts.gpu_budget, cpu_budget=opts.cpu_budget, tau=opts.tau,
                   cold_mode=opts.cold_mode, ctx_len=opts.ctx_len, time_limit=opts.time_limit, dtype=eopts.dtype,
                   log=log).save(spath)
        pl = Placement.load(spath)
    else:
        log(f"placement: reusing {spath}")
    state["placement"] = {"key": skey, "content": pl.content_hash, "path": str(spath)}
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    res.placement_summary = pl.summary()

    # ---- bundle ---------------------------------------------------------------------------------
    ekey = sha256_json({"model": src.fingerprint, "placement": pl.content_hash, "profile": prof.content_hash,
                        "options": eopts.to_json()})
    bundle = _reusable(state, "bundle", ekey, lambda: Bundle.load(out), lambda b: b.manifest["manifest_sha256"])
    res.reused["bundle"] = bundle is not None
    if bundle is None:
        log(f"exporting -> {out}")
        er = export_bundle(src, pl, out, profile=prof, options=eopts, log=log)
        manifest = er.manifest
    else:
        log(f"bundle: reusing {out}")
        manifest = bundle.manifest
    state["bundle"] = {"key": ekey, "content": manifest["manifest_sha256"], "path": str(out)}
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    res.keys = {"profile": pkey, "placement": skey, "bundle": ekey}
    res.export_manifest = manifest
    return res


def compile_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write; intermediate artifacts go "
                                                              "to OUT.parts/ beside it.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model: an id (smollm2-135m), a .gguf file, or a Hugging Face directory.")] = "smollm2-135m",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="mbpp, mbpp:PATH, jsonl:PATH, txt:PATH or embedded.")] = "mbpp",
    split: Annotated[str | None, typer.Option("--split", help="Dataset split to profile (MBPP default: test).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Profile at most N prompts.")] = 32,
    mode: Annotated[str, typer.Option("--profile-mode", help="teacher-forced (fast, batched) or generate.")] = "teacher-forced",
    samples: Annotated[int, typer.Option("--samples", min=0, help="(x, mask) samples to keep (predictors, gate rule).")] = 2048,
    preset: Annotated[str | None, typer.Option("--preset", help="Hardware preset: pc-high, pc-low or h200.")] = "pc-high",
    hardware: Annotated[Path | None, typer.Option("--hardware", help="Hardware spec JSON (wins over --preset).")] = None,
    policy: Annotated[str, typer.Option("--policy", help="fixed, impact or adaptive.")] = "adaptive",
    gpu_budget: Annotated[str | None, typer.Option("--gpu-budget", help="GPU memory for the placement, e.g. 200MiB, 24GiB.")] = None,
    cpu_budget: Annotated[str | None, typer.Option("--cpu-budget", help="CPU memory for the placement.")] = None,
    cold_mode: Annotated[str, typer.Option("--cold-mode", help="threshold, predictor or exact (what the solver models).")] = "threshold",
    ctx_len: Annotated[int | None, typer.Option("--ctx-len", min=1, help="Context the KV cache is sized for (default: the model's maximum).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype of the bundle (and of the solver's account): fp32, "
                                                       "bf16, fp16, or quantized q4 / q8 / q4a / q8a (docs/quantized.md).")] = "fp32",
    rule: Annotated[str, typer.Option("--rule", help="Activation rule: product or gate.")] = "product",
    cpu_layout: Annotated[str, typer.Option("--cpu-layout", help="auto, bundled or split (see `hotcold export --help`).")] = "auto",
    sparsity: Annotated[float, typer.Option("--sparsity", min=0.0, max=0.999, help="Target per-layer sparsity for t_l.")] = 0.5,
    predictors: Annotated[bool, typer.Option("--predictors", help="Train and export ONNX predictors.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where profiling runs: auto (cuda when present), cuda or cpu.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")] = False,
) -> None:
    """Compile a model for a GPU budget in one command: profile -> solve -> export. Intermediate artifacts are
    kept in OUT.parts/ and reused when their inputs are unchanged (a new --gpu-budget re-solves and re-exports
    without re-profiling).

    Example: hotcold compile -m smollm2-135m --dataset mbpp --gpu-budget 300MiB -o out/bundle
    """
    from hotcold.clikit import err, out, print_json
    from hotcold.exporter.cli import _options
    from hotcold.memory import canonical_dtype

    copts = CompileOptions(dataset=dataset, split=split, limit=limit, mode=mode, samples=samples, preset=preset,
                           hardware=str(hardware) if hardware else None, policy=policy, gpu_budget=gpu_budget,
                           cpu_budget=cpu_budget, cold_mode=cold_mode, ctx_len=ctx_len, device=device)
    eopts = _options(canonical_dtype(dtype), rule, sparsity, None, predictors, 0.9, 30, "", None, cpu_layout)
    res = compile_bundle(model, out_dir, copts, eopts, log=lambda s: err.print(f"[dim]{s}[/]"))
    info = {"bundle": str(res.bundle), "parts": str(res.parts), "reused": res.reused, "keys": res.keys,
            "placement": res.placement_summary, "n_hot": res.export_manifest["placement"]["n_hot"],
            "gpu_bytes": res.export_manifest["memory"]["gpu_total"],
            "cpu_bytes": res.export_manifest["memory"]["cpu_total"]}
    if json_out:
        print_json(info)
        return
    from hotcold.memory import format_bytes

    reused = ", ".join(k for k, v in res.reused.items() if v) or "nothing"
    out.print(f"wrote {res.bundle} (GPU part {format_bytes(info['gpu_bytes'])}, CPU part "
              f"{format_bytes(info['cpu_bytes'])}); reused: {reused}; parts in {res.parts}")
    out.print(f"next: hotcold run {res.bundle} --prompt \"...\"")


def register_compile(app: typer.Typer) -> None:
    from hotcold.clikit import command

    app.command("compile")(command(compile_cmd))
