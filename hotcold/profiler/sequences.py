"""Workload tasks -> token sequences the profiler runs: a prompt, and in teacher-forced mode the reference
continuation. Prompt text comes from hotcold.workloads (MBPP prompt, chat template or raw)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig
from hotcold.model.weights import WeightSource

MODES = ("generate", "teacher-forced")


@dataclass(frozen=True)
class PromptTokens:
    """One profiled sequence. `prompt` tokens are prefill; `continuation` (teacher-forced) is decode."""

    id: str
    prompt: tuple[int, ...]
    continuation: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.prompt:
            raise InputError(f"prompt {self.id} encodes to no tokens", "remove the empty prompt")

    def __len__(self) -> int:
        return len(self.prompt) + len(self.continuation)


class ByteTokenizer:
    """Stand-in for models without a tokenizer (random test models): token = 3 + byte (mod vocab - 3).

    Ids 0, 1, 2 are pad, BOS and EOS. Chat prompts are a plain transcript, as for template-less models.
    """

    def __init__(self, cfg: ModelConfig):
        if cfg.vocab_size < 4:
            raise InputError(f"vocab size {cfg.vocab_size} is too small for the byte stand-in tokenizer",
                             "use a model with a tokenizer")
        self.vocab = cfg.vocab_size
        self.bos_id = cfg.bos_token_id
        self.eos_ids = tuple(cfg.eos_token_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = [3 + b % (self.vocab - 3) for b in text.encode("utf-8")]
        if add_bos is not False and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return bytes((i - 3) % 256 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def tokenizer_for(src: WeightSource) -> Any:
    """The model's tokenizer, or the byte stand-in when it has none."""
    tk = src.tokenizer()
    return tk if tk is not None else ByteTokenizer(src.config)


def encode_tasks(tasks: Iterable[Any], tokenizer: Any, mode: str, prompt_format: str = "chat") -> list[PromptTokens]:
    """Tasks (hotcold.workloads.Task) -> PromptTokens. Teacher-forced mode adds the reference code."""
    from hotcold.workloads import format_prompt, teacher_forced

    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}", f"use one of: {', '.join(MODES)}")
    render = tokenizer.render_chat  # a template-less model renders a plain transcript (model/tokenizer.py)
    out = []
    for task in tasks:
        if mode == "teacher-forced":
            prompt, code = teacher_forced(task, prompt_format, render)
            out.append(PromptTokens(task.id, tuple(tokenizer.encode(prompt)),
                                    tuple(tokenizer.encode(code, add_bos=False))))
        else:
            out.append(PromptTokens(task.id, tuple(tokenizer.encode(format_prompt(task, prompt_format, render)))))
    return out


def fit_context(seqs: list[PromptTokens], max_len: int, mode: str, max_new_tokens: int) -> tuple[list[PromptTokens], int]:
    """Cut sequences to the model's context. Generate mode keeps room for at least one new token.

    Returns the sequences and how many were cut (recorded in the manifest; tokens beyond the context
    are not profiled).
    """
    cut = 0
    out = []
    room = max_len - 1 if mode == "generate" else max_len
    for s in seqs:
        if mode == "generate" and len(s.prompt) > room:
            s = PromptTokens(s.id, s.prompt[:room])
            cut += 1
        elif mode == "teacher-forced" and len(s) > room:
            keep_p = min(len(s.prompt), room)
            s = PromptTokens(s.id, s.prompt[:keep_p], s.continuation[:room - keep_p])
            cut += 1
        out.append(s)
    return out, cut


def sequences_digest(seqs: Sequence[PromptTokens]) -> str:
    """Hash of every sequence's id and tokens (part of a run's identity, for resuming)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(s.id.encode())
        h.update(b"\0" + ",".join(map(str, s.prompt)).encode() + b"|" + ",".join(map(str, s.continuation)).encode())
    return h.hexdigest()
