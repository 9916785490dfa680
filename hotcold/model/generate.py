"""Token generation over any model with `new_cache()` and `forward(tokens, start, cache, last_only=True)`
(the dense reference and the hybrid runtime both qualify)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class CausalLM(Protocol):
    def new_cache(self, batch: int = 1, max_len: int | None = None) -> Any: ...

    def forward(self, tokens: torch.Tensor, start: int = 0, cache: Any = None, **kw: Any) -> torch.Tensor: ...


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_seconds: float
    decode_seconds: float  # time of the decode steps (every new token after the first)
    stop_reason: str  # "eos" | "length" | "stopped" (on_token asked to stop)
    logits: list[torch.Tensor] = field(default_factory=list)  # per new token [V], when kept

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.new_ids) - 1  # the first new token comes out of prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None, top_p: float = 1.0) -> int:
    """Greedy at temperature 0; else a draw from softmax(logits / T), restricted to the smallest set of
    most likely tokens whose probability reaches top_p (nucleus sampling) when top_p < 1."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p  # the first token is always kept
        p = p * keep
        return int(idx[torch.multinomial(p / p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate(model: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, eos_ids: Sequence[int] = (), on_token: Callable[[int], bool | None] | None = None,
             keep_logits: bool = False, forward_kw: dict[str, Any] | None = None, top_p: float = 1.0) -> Generation:
    """Prefill the prompt, then decode one token at a time (greedy at temperature 0) until EOS or length.

    on_token(tok) is called with each new token; returning True stops generation there (stop strings,
    a client that went away)."""
    kw = forward_kw or {}
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("empty prompt")
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    logits = model.forward(torch.tensor([ids]), 0, cache, last_only=True, **kw)[0, -1]
    if logits.is_cuda:  # kernels run asynchronously: the prefill ends when its logits exist
        torch.cuda.synchronize(logits.device)
    t1 = time.perf_counter()
    new: list[int] = []
    kept: list[torch.Tensor] = []
    stop = "length"
    pos = len(ids)
    while len(new) < max_new_tokens:
        if keep_logits:
            kept.append(logits.clone())
        tok = sample(logits, temperature, gen, top_p)
        new.append(tok)
        if on_token and on_token(tok):
            stop = "stopped"
            break
        if tok in eos_ids:
            stop = "eos"
            break
        if len(new) == max_new_tokens:
            break
        logits = model.forward(torch.tensor([[tok]]), pos, cache, last_only=True, **kw)[0, -1]
        pos += 1
    t2 = time.perf_counter()
    return Generation(prompt_ids=ids, new_ids=new, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                      stop_reason=stop, logits=kept)


@torch.inference_mode()
def generate_batch(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   eos_ids: Sequence[int] = (), pad_id: int = 0,
                   stop: Callable[[int, list[int]], bool] | None = None,
                   on_step: Callable[[int], None] | None = None) -> list[Generation]:
    """Greedy generation for several prompts at once: the prompts are left-padded to one length (each
    prefilled alone into its row when the cache has `copy_row`, else all in one forward), then every
    step decodes one token for all unfinished rows (`forward(..., pad=...)` masks the padding and
    counts positions from each row's first real token). A row finishes
    at an EOS id, at `max_new_tokens`, or when `stop(row, new_ids)` is true (a stop string, a closed
    code block); finished rows leave the batch (their KV-cache rows are dropped when the cache has
    `select_rows`), so the batch shrinks instead of computing tokens nobody reads.

    `on_step(n_active)` is called after each decode step. Timings are the batch's: every row reports
    the same prefill and decode seconds."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    B = len(prompts)
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts])
    tokens = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts])
    cache = model.new_cache(B, L + max_new_tokens)
    eos = set(int(e) for e in eos_ids)
    t0 = time.perf_counter()
    if hasattr(cache, "copy_row") and B > 1:
        # Each prompt prefilled alone (causal attention without a mask, no padding computed), its
        # keys/values copied into its row of the batch cache, right-aligned at slot L.
        rows_logits = []
        for b, p in enumerate(prompts):
            one = model.new_cache(1, len(p))
            rows_logits.append(model.forward(torch.tensor([list(p)]), 0, one, last_only=True)[0, -1])
            cache.copy_row(one, b, L - len(p))
            del one
        logits = torch.stack(rows_logits)
    else:
        logits = model.forward(tokens, 0, cache, last_only=True, pad=pad)[:, -1]  # [B, V]
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    t1 = time.perf_counter()
    new: list[list[int]] = [[] for _ in range(B)]
    reason = ["length"] * B
    rows: list[int | None] = list(range(B))  # original index of each batch row; None once it finished
    compact = hasattr(cache, "select_rows")
    pos = L
    while True:
        nxt = torch.argmax(logits, dim=-1).tolist()
        for r, tok in zip(rows, nxt):
            if r is None:
                continue
            new[r].append(tok)
            if tok in eos:
                reason[r] = "eos"
            elif stop is not None and stop(r, new[r]):
                reason[r] = "stopped"
            elif len(new[r]) < max_new_tokens:
                continue
            rows[rows.index(r)] = None
        keep = [j for j, r in enumerate(rows) if r is not None]
        if not keep:
            break
        if compact and len(keep) < len(rows):
            idx = torch.tensor(keep)
            cache.select_rows(idx)
            pad, nxt, rows = pad[idx], [nxt[j] for j in keep], [rows[j] for j in keep]
        logits = model.forward(torch.tensor(nxt)[:, None], pos, cache, last_only=True, pad=pad)[:, -1]
        pos += 1
        if on_step is not None:
            on_step(len(keep))
    t2 = time.perf_counter()
    return [Generation(prompt_ids=list(p), new_ids=new[i], prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                       stop_reason=reason[i]) for i, p in enumerate(prompts)]
