"""`hotcold eval pass1`: MBPP / HumanEval pass@1 of the dense model, batched, resumable, sandboxed.

Nothing heavy is imported at module level: torch and the model load inside the command.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hotcold.clikit import JsonOpt, ModelOpt, command, err, out, print_json

PASS1_HELP = """pass@1 of the dense model: one greedy answer per task, its code run against the task's tests in
the sandbox; a JSON with every task's status, answer and code, the rate and its 95% interval.

The prompt is the model's chat template around one user turn: for MBPP the task text and its test
asserts, for HumanEval EvalPlus's instruction prompt; the code is the answer's first fenced block, and
generation stops at end-of-turn or as soon as that block is closed (or at --max-new-tokens). Tasks
are sorted by prompt length and run --batch-size at a time. A checkpoint (OUT.partial.json) is
written every --checkpoint-every tasks; the same command resumes from it.

Examples:

  hotcold eval pass1 -m qwen2.5-coder-0.5b --dataset mbpp --split test -o pass1_mbpp.json

  hotcold eval pass1 -m qwen2.5-coder-1.5b --dataset mbpp --offset 0 --limit 100 --batch-size 8 -o slice.json

  hotcold eval pass1 -m qwen2.5-coder-0.5b --dataset humaneval -o pass1_humaneval.json
"""


def pass1_cmd(
    model: ModelOpt = "qwen2.5-coder-0.5b",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="mbpp, mbpp:PATH, humaneval, humaneval:PATH, embedded or jsonl:PATH (tasks with tests).")] = "mbpp",
    split: Annotated[Optional[str], typer.Option("--split", help="MBPP: test (11-510, default), train, validation, prompt, all.")] = None,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many tasks of the split.")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Run at most this many tasks.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens per answer at most.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Tasks per forward.")] = 8,
    max_batch_tokens: Annotated[int, typer.Option("--max-batch-tokens", min=1, help="KV-cache slots per batch at most (rows x (longest prompt + max new tokens)); long prompts run in smaller batches.")] = 16384,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Write the checkpoint after this many tasks.")] = 16,
    window: Annotated[int, typer.Option("--window", min=1, help="Tasks are run in their order, this many at a time, sorted by prompt length within each (a stopped run covers a prefix).")] = 64,
    no_stop_at_fence: Annotated[bool, typer.Option("--no-stop-at-fence", help="Generate past the first closed code block (to EOS or the limit).")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 or bf16 weights.")] = "fp32",
    timeout_s: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds of wall clock per task in the sandbox.")] = 20.0,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="The result JSON (written to a temp file, then renamed).")] = Path("pass1.json"),
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Ignore (and overwrite) an existing checkpoint.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads (0: torch's default). On a machine shared with other jobs 1 is often fastest.")] = 0,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", min=0.0, max=0.99, help="Decode as the runtime's threshold mode does (product rule |act(g)·u| > t_l, t_l from --profile at this sparsity); cold neurons only, prefill dense.")] = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="With --sparsity: the Profile whose activation histograms set each layer's threshold.")] = None,
    placement: Annotated[Optional[Path], typer.Option("--placement", help="With --sparsity: its hot neurons stay dense (default: every neuron is cold).")] = None,
    gpu_share: Annotated[Optional[float], typer.Option("--gpu-share", min=0.0, max=1.0, help="With --sparsity, instead of --placement: solve one from --profile with this share of the FFN on the GPU.")] = None,
    policy: Annotated[str, typer.Option("--policy", help="With --gpu-share: fixed (PowerInfer's global tau) or adaptive (latency MILP).")] = "fixed",
    hardware: Annotated[str, typer.Option("--hardware", help="With --gpu-share: the hardware preset or JSON whose cost model the adaptive policy uses.")] = "pc-high",
    json_out: JsonOpt = False,
) -> None:
    import os

    # Before the first parallel region: spinning OpenMP workers stall every op when other processes
    # share the cores (conftest.py sets the same for the test suite). An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if threads:
        torch.set_num_threads(threads)

    from hotcold.errors import InputError
    from hotcold.model.cli import torch_dtype
    from hotcold.model.dense import DenseModel
    from hotcold.model.registry import load_source
    from hotcold.quality.passk import Pass1Config, run_pass1
    from hotcold.workloads import load_dataset

    if dtype not in ("fp32", "bf16"):
        raise InputError(f"--dtype {dtype} is not available on the CPU path", "use fp32 or bf16")
    cfg = Pass1Config(max_new_tokens=max_new_tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                      checkpoint_every=checkpoint_every, window=window,
                      stop_at_fence=not no_stop_at_fence, timeout_s=timeout_s)
    ds = load_dataset(dataset, split, limit=limit, offset=offset)
    if not all(t.tests for t in ds.tasks):
        raise InputError(f"dataset {dataset} has tasks without tests", "pass@1 needs tasks with test asserts (mbpp, humaneval, embedded)")
    src = load_source(model)
    tok = src.tokenizer()
    if tok is None:
        raise InputError(f"{src.description} has no tokenizer", "use a GGUF with tokenizer metadata")
    sparse = _sparse_setup(src, sparsity, profile, placement, gpu_share, policy, hardware)
    err.print(f"[dim]loading {src.description} ({dtype})…[/]")
    m = DenseModel.from_source(src, torch_dtype(dtype), "cpu")  # the model's whole context: MBPP has 3.7k-token prompts
    _release_freed_memory()
    if sparse is not None:
        from hotcold.quality.sparse import ThresholdEmulation

        info, hot, thr = sparse
        m = ThresholdEmulation(m, hot, thr)
        err.print(f"[dim]decoding at sparsity {sparsity} (product rule), {info['hot_fraction']:.1%} of the neurons "
                  f"dense ({info['placement']['how']})[/]")
    header = {"model": {"spec": model, "description": src.description, "fingerprint": src.fingerprint,
                        "name": src.config.name},
              "dataset": {k: v for k, v in ds.describe().items() if k != "ids"}, "dtype": dtype,
              "command": " ".join(["hotcold", *sys.argv[1:]]), "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "date": time.strftime("%Y-%m-%d")}
    if sparse is not None:
        header["sparse"] = sparse[0]
    res = run_pass1(m, tok, ds.tasks, cfg, out_path, header=header, resume=not no_resume,
                    on_batch=None if sparse is None else lambda r: r.sessions[-1].update(sparse_measured=m.measured()))
    s = res.summary()
    if json_out:
        print_json({k: v for k, v in res.to_json().items() if k != "tasks"})
        return
    lo, hi = s["interval_95"]["wilson"]
    tp = s["throughput"]
    out.print(f"pass@1 {s['passed']}/{s['n']} = {100 * s['pass_at_1']:.1f}%  (95% Wilson {100 * lo:.1f}–{100 * hi:.1f}%)  "
              f"{s['by_status']}")
    if sparse is not None:
        frac = m.measured()["cold_active_fraction"]
        out.print(f"sparse decode: product rule at sparsity {sparsity}, {sparse[0]['hot_fraction']:.1%} of the neurons dense; "
                  f"cold neurons active {'n/a' if frac is None else f'{frac:.3f}'} of the time (this session)")
    out.print(f"{tp['tasks_per_minute']} tasks/min, {tp['generated_tokens_per_s']} generated tok/s; wrote {out_path}")


def _sparse_setup(src, sparsity, profile, placement, gpu_share, policy, hardware):
    """(header entry, hot mask [L, F], thresholds [L]) for --sparsity, or None; one clear line on bad input."""
    from hotcold.errors import InputError

    given = {"--profile": profile, "--placement": placement, "--gpu-share": gpu_share}
    if sparsity is None:
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise InputError(f"{', '.join(extra)} without --sparsity", "add --sparsity S (e.g. 0.5) or drop them")
        return None
    if profile is None:
        raise InputError("--sparsity needs --profile (its histograms set each layer's threshold)",
                         "pass --profile DIR, the profile of this model (`hotcold profile run`)")
    if placement is not None and gpu_share is not None:
        raise InputError("--placement and --gpu-share both given", "pass one: a solved placement, or a share to solve for")
    if policy not in ("fixed", "adaptive"):
        raise InputError(f"--policy {policy} is not one of fixed, adaptive", "pass --policy fixed or --policy adaptive")
    import numpy as np

    from hotcold.exporter.export import _check_same_model
    from hotcold.profiler.artifact import Profile
    from hotcold.solver.placement import Placement

    prof = Profile.load(profile)
    _check_same_model("profile", prof, src)
    cfg = src.config
    if gpu_share is not None:
        from hotcold.profiler.hotsets import placement_at_share

        pl, _ = placement_at_share(prof, gpu_share, policy, hardware)
        how = f"{policy} placement at {gpu_share:.0%} of the FFN on the GPU, solved from {profile} ({hardware})"
    elif placement is not None:
        pl = Placement.load(placement)
        _check_same_model("placement", pl, src)
        how = f"placement {placement} ({pl.policy})"
    else:
        pl, how = None, "no placement: every neuron cold"
    hot = pl.hot_mask() if pl is not None else np.zeros((cfg.n_layers, cfg.n_ff), dtype=bool)
    thr = [float(t) for t in prof.magnitude_thresholds(sparsity, "decode")]
    info = {"rule": "product", "sparsity": sparsity, "prefill": "dense", "thresholds": thr,
            "hot_fraction": float(hot.mean()), "n_hot": [int(v) for v in hot.sum(1)],
            "profile": {"path": str(profile), "content_hash": prof.content_hash},
            # a placement solved here is identified by its hot set (its manifest carries the solve's timing,
            # so its content hash differs between two solves of the same set and a resume would be refused)
            "placement": {"how": how, "path": str(placement) if placement else None,
                          "content_hash": pl.content_hash if pl is not None and gpu_share is None else None,
                          "hot_set_sha256": hashlib.sha256(np.packbits(hot).tobytes()).hexdigest(),
                          "policy": pl.policy if pl is not None else None},
            "how": "hotcold.quality.sparse.ThresholdEmulation: the runtime's threshold mode (product rule) on the "
                   "batched dense model's decode steps"}
    return info, hot, thr


def _release_freed_memory() -> None:
    """Hand the loader's freed buffers back to the OS (glibc keeps them otherwise: the 1.5B's process
    stayed at 8.6 GB for 6.2 GB of weights), so a long run holds only what it uses."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Evaluate the model's answers (pass@1 on MBPP / HumanEval in the sandbox).",
                        no_args_is_help=True)
    group.command("pass1", help=PASS1_HELP)(command(pass1_cmd))
    app.add_typer(group, name="eval")
