"""`run_prompt()`: load a bundle, generate for one prompt, return the text and the measurements (the
library function behind `hotcold run`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hotcold.errors import InputError


def prompt_token_ids(bundle: Any, prompt: str | None, chat: bool, token_ids: Sequence[int] | None) -> list[int]:
    if token_ids:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < bundle.config.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {bundle.config.vocab_size})",
                             "pass ids the model knows")
        return ids
    if not prompt:
        raise InputError("the prompt is empty", "pass --prompt TEXT (or --token-ids for a bundle without a tokenizer)")
    tok = bundle.tokenizer
    if tok is None:
        raise InputError(f"bundle {bundle.path} has no tokenizer (its model had none)", "pass --token-ids 1,2,3")
    return tok.chat_ids(prompt) if chat else tok.encode(prompt)


def run_prompt(bundle: str, prompt: str | None = None, *, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, chat: bool = True, token_ids: Sequence[int] | None = None,
               mode: str = "threshold", device: str = "auto", gpu_budget: int | str | None = None,
               prefill: str = "dense", threshold: float | None = None, max_len: int | None = None,
               verify: str = "full", expect_fingerprint: str | None = None, predictor_backend: str = "torch",
               on_token: Callable[[int], bool | None] | None = None, model: Any = None,
               resident: bool | None = None, **model_kw: Any) -> dict[str, Any]:
    """Generate from a bundle; returns {text, token ids, tokens/s, per-layer times, GPU share, memory,
    which kernels and graphs ran, ...}."""
    from hotcold.bundle import Bundle
    from hotcold.runtime.build import from_bundle

    if model is None:
        b = Bundle.load(bundle, verify=verify, expect_fingerprint=expect_fingerprint)
        ids = prompt_token_ids(b, prompt, chat, token_ids)
        need = len(ids) + max_new_tokens
        model = from_bundle(b, mode=mode, device=device, gpu_budget=gpu_budget, prefill=prefill,
                            thresholds=threshold, max_len=max_len or need, predictor_backend=predictor_backend,
                            resident=resident, **model_kw)
    else:
        ids = prompt_token_ids(model.bundle, prompt, chat, token_ids)
    g = model.generate(ids, max_new_tokens, temperature, seed, on_token, top_p=top_p)
    tok = model.bundle.tokenizer
    rep = model.report()
    return {"text": tok.decode(g.new_ids) if tok is not None else None, "prompt_tokens": len(ids),
            "new_tokens": len(g.new_ids), "new_ids": g.new_ids, "stop_reason": g.stop_reason,
            "prefill_tokens_per_s": round(g.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(g.decode_tokens_per_s, 3),
            "decode_ms_per_token": round(1e3 / g.decode_tokens_per_s, 4) if g.decode_tokens_per_s else None,
            "prefill_seconds": g.prefill_seconds, "decode_seconds": g.decode_seconds, **rep}
