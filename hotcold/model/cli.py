"""`hotcold fetch`, `hotcold generate`, `hotcold inspect`: models and the dense reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hotcold.clikit import DeviceOpt, JsonOpt, ModelOpt, SeedOpt, command, err, out, print_json

DTYPES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str):
    from hotcold.devices import torch_dtype as to_torch
    from hotcold.errors import InputError

    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}", f"use one of: {', '.join(DTYPES)}")
    return to_torch(name)


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' (hotcold.devices.resolve_device's checks)."""
    from hotcold.devices import resolve_device as resolve

    return resolve(device).type


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    from hotcold.errors import InputError

    if not prompt:
        raise InputError("the prompt is empty", "pass --prompt TEXT")
    return tok.chat_ids(prompt) if chat else tok.encode(prompt)


def fetch_cmd(
    model_id: Annotated[str, typer.Argument(help="Model id to fetch, e.g. smollm2-135m.")] = "smollm2-135m",
    save_tokenizer: Annotated[Path | None, typer.Option("--save-tokenizer", help="Also write the model's tokenizer (tokenizer.json + tokenizer_config.json, ~3 MB) to this directory, e.g. to lend it to a random 70B-shaped model on a machine the model file cannot reach (random:SHAPE:tokenizer=DIR).")] = None,
) -> None:
    """Download a known model into $HOTCOLD_HOME (default ~/.cache/hotcold), verify it, print its path.

    Example: hotcold fetch smollm2-135m
    """
    from hotcold.model.registry import fetch, load_source

    path = fetch(model_id)
    out.print(str(path))
    if save_tokenizer is not None:
        tok = load_source(str(path)).tokenizer()
        if tok is None:
            from hotcold.errors import InputError

            raise InputError(f"{model_id} has no tokenizer to save", "drop --save-tokenizer")
        out.print(str(tok.save(save_tokenizer)))


def generate_cmd(
    model: ModelOpt = "smollm2-135m",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message when the chat template is used).")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    seed: SeedOpt = 0,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="Feed the prompt as raw text.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16 (fp16 needs CUDA).")] = "fp32",
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Generate text with the dense reference model (streams tokens; stops at EOS).

    Example: hotcold generate --model smollm2-135m --prompt "Write a python function to check if a number is even."
    """
    from hotcold.model.dense import DenseModel
    from hotcold.model.generate import generate
    from hotcold.model.registry import load_source

    src = load_source(model)
    tok = src.tokenizer()
    if tok is None:
        from hotcold.errors import InputError

        raise InputError(f"{src.description} has no tokenizer", "use a GGUF with tokenizer metadata or an HF dir with tokenizer.json")
    ids = prompt_ids(tok, prompt, not no_chat_template)
    dev = resolve_device(device)
    m = DenseModel.from_source(src, torch_dtype(dtype), dev, max_len=len(ids) + max_new_tokens)
    streamed: list[int] = []
    shown = ""

    def on_token(t: int) -> None:
        nonlocal shown
        if json_out:
            return
        streamed.append(t)
        text = tok.decode(streamed)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            out.print(text[len(shown):], end="", markup=False)
            shown = text

    g = generate(m, ids, max_new_tokens, temperature, seed, tok.eos_ids, on_token)
    text = tok.decode(g.new_ids)
    result = {"text": text, "prompt_tokens": len(ids), "new_tokens": len(g.new_ids), "stop_reason": g.stop_reason,
              "prefill_tokens_per_s": round(g.prefill_tokens_per_s, 2),
              "decode_tokens_per_s": round(g.decode_tokens_per_s, 2), "model": src.description, "dtype": dtype,
              "device": dev}
    if json_out:
        print_json(result)
    else:
        out.print(text[len(shown):], markup=False)
        err.print(f"[dim]{len(ids)} prompt tokens, {len(g.new_ids)} new ({g.stop_reason}); prefill "
                  f"{g.prefill_tokens_per_s:.1f} tok/s, decode {g.decode_tokens_per_s:.1f} tok/s[/]")


def inspect_cmd(model: ModelOpt = "smollm2-135m", json_out: JsonOpt = False) -> None:
    """Show a model's configuration, size and fingerprint without loading its weights.

    Example: hotcold inspect --model random:llama2-70b
    """
    from rich.table import Table

    from hotcold.model.registry import load_source

    src = load_source(model)
    cfg = src.config
    info = {"source": src.description, "fingerprint": src.fingerprint, "params": cfg.n_params, **cfg.to_json()}
    if hasattr(src, "summary"):  # a GGUF file: its architecture, quantization and tokenizer
        info.update(src.summary())
    if json_out:
        print_json(info)
        return
    t = Table(title=f"{cfg.name}", show_header=False)
    for k, v in info.items():
        t.add_row(k, str(v))
    out.print(t)


def register(app: typer.Typer) -> None:
    app.command("fetch")(command(fetch_cmd))
    app.command("generate")(command(generate_cmd))
    app.command("inspect")(command(inspect_cmd))
