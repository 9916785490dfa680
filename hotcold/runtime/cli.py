"""`hotcold run`: generate from a Bundle with the hybrid runtime (options like `hotcold generate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hotcold.clikit import JsonOpt, SeedOpt, command, err, out, print_json

MODES = ("exact", "threshold", "predictor")


def _ids(text: str | None) -> list[int] | None:
    from hotcold.errors import InputError

    if not text:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--token-ids {text!r} is not a comma-separated list of integers", "pass e.g. 1,15,27") from None


def run_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `hotcold export` or `hotcold compile`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message when the chat template is used).")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: draw from the most likely tokens whose probability reaches this (with --temperature > 0).")] = 1.0,
    seed: SeedOpt = 0,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="Feed the prompt as raw text.")] = False,
    cold_mode: Annotated[str, typer.Option("--cold-mode", help="How cold neurons are found: exact (all of them), "
                                                     "threshold (the bundle's rule |a| > t_l, a = act(gate)·up or "
                                                     "act(gate)), predictor (ONNX predictor, then the rule).")] = "threshold",
    device: Annotated[str, typer.Option("--device", help="Where the GPU side runs: auto (cuda when present), cuda or cpu.")] = "auto",
    gpu_budget: Annotated[str, typer.Option("--gpu-budget", help="Refuse to run if the bundle's GPU part (with the KV "
                                                                 "cache) exceeds this, e.g. 24GiB.")] = "",
    prefill: Annotated[str, typer.Option("--prefill", help="dense (prompt computed exactly) or sparse (same rule as decoding).")] = "dense",
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0, help="Override the bundle's t_l with one value for every layer.")] = None,
    ctx_len: Annotated[int | None, typer.Option("--ctx-len", min=1, help="Context (prompt + new tokens) the KV cache is sized for (default: prompt + new tokens).")] = None,
    verify: Annotated[str, typer.Option("--verify", help="full (sha256 of every file), size, or none.")] = "full",
    model: Annotated[str, typer.Option("--model", "-m", help="Fail unless the bundle was exported from this model (id, .gguf or HF dir).")] = "",
    token_ids: Annotated[str, typer.Option("--token-ids", help="Prompt as token ids (bundles of models without a tokenizer).")] = "",
    predictor_backend: Annotated[str, typer.Option("--predictor-backend", help="torch or onnxruntime.")] = "torch",
    resident: Annotated[bool | None, typer.Option("--resident/--mmap", help="Copy the CPU worker's weights into memory "
                                                      "at load (faster to stream) or keep them memory-mapped. Default: "
                                                      "copied when they fit in half of the available memory.")] = None,
    cpu_kernel: Annotated[str, typer.Option("--cpu-kernel", help="The cold kernel: auto (numba when installed), numba or torch.")] = "auto",
    gpu_kernels: Annotated[str, typer.Option("--gpu-kernels", help="The GPU side's ops: auto (Triton on CUDA), triton or torch.")] = "auto",
    graphs: Annotated[bool, typer.Option("--graphs/--no-graphs", help="Capture the decode step as CUDA graphs (CUDA only).")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Generate text from a Bundle: attention and hot neurons on the GPU side, cold neurons on a CPU worker.

    Examples:

      hotcold run out/bundle --prompt "Write a python function to reverse a string."

      hotcold run out/bundle -p "..." --cold-mode exact --json     (per-layer times, GPU share, memory)
    """
    from hotcold.errors import InputError
    from hotcold.runtime.run import run_prompt

    if cold_mode not in MODES:
        raise InputError(f"unknown --cold-mode {cold_mode!r}", f"use one of: {', '.join(MODES)}")
    expect = None
    if model:
        from hotcold.model.registry import load_source

        expect = load_source(model, quiet=True).fingerprint
    streamed: list[int] = []
    shown = ""
    tok_holder: dict = {}

    def on_token(t: int) -> None:
        nonlocal shown
        tok = tok_holder.get("tok")
        if json_out or tok is None:
            return
        streamed.append(t)
        text = tok.decode(streamed)
        if not text.endswith("\ufffd"):
            out.print(text[len(shown):], end="", markup=False)
            shown = text

    from hotcold.bundle import Bundle
    from hotcold.runtime.build import from_bundle
    from hotcold.runtime.run import prompt_token_ids

    b = Bundle.load(bundle, verify=verify, expect_fingerprint=expect)
    tok_holder["tok"] = b.tokenizer
    ids = prompt_token_ids(b, prompt, not no_chat_template, _ids(token_ids))
    m = from_bundle(b, mode=cold_mode, device=device, gpu_budget=gpu_budget or None, prefill=prefill, thresholds=threshold,
                    max_len=ctx_len or len(ids) + max_new_tokens, predictor_backend=predictor_backend,
                    resident=resident, cpu_backend=cpu_kernel, gpu_kernels=gpu_kernels, graphs=graphs)
    res = run_prompt(str(bundle), prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, chat=not no_chat_template, token_ids=_ids(token_ids), on_token=on_token, model=m)
    if json_out:
        print_json(res)
        return
    text = res["text"] if res["text"] is not None else " ".join(map(str, res["new_ids"]))
    out.print(text[len(shown):], markup=False)
    d = res["decode"]
    share = d["gpu_share"] if d["gpu_share"] is not None else res["prefill"]["gpu_share"]
    dev = res["device"]
    err.print(f"[dim]{res['prompt_tokens']} prompt tokens, {res['new_tokens']} new ({res['stop_reason']}); prefill "
              f"{res['prefill_tokens_per_s']:.1f} tok/s, decode {res['decode_tokens_per_s']:.1f} tok/s; cold mode {cold_mode}; "
              f"GPU side {dev['gpu_side']} ({dev['gpu_kernels']} ops, graphs {'on' if dev['cuda_graphs'] else 'off'}), "
              f"CPU worker {dev['cpu_kernel']} kernel {d['cpu_ms_per_token']:.2f} ms/token; GPU share of activated "
              f"neurons {'n/a' if share is None else f'{share:.1%}'}[/]")


def register(app: typer.Typer) -> None:
    app.command("run")(command(run_cmd))
