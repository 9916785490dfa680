"""Tokenizers built with the `tokenizers` library, from GGUF metadata or a tokenizer.json, and the
model's chat template rendered with jinja2 the way Hugging Face renders it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotcold.errors import InputError

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (the same split llama.cpp applies).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # LLaMA-3's split with digits one by one
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (GPT2_REGEX,),
    "gpt2": (GPT2_REGEX,),
    "smollm": (r"\p{N}", GPT2_REGEX),  # digits split one by one, then GPT-2's split
    "llama-bpe": (LLAMA3_REGEX,),
    "llama3": (LLAMA3_REGEX,),
    "qwen2": (QWEN2_REGEX,),
}
# End-of-generation tokens besides the declared EOS, by their text (what llama.cpp's `special_eog_ids`
# collects): a chat model may end its answer with one of these even when the file names another token
# EOS (Qwen2.5 declares <|im_end|>; its generation config also stops at <|endoftext|>). `stop_ids`.
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "<|EOT|>")

DEFAULT_SYSTEM = "You are an expert Python programmer."


@dataclass
class Tokenizer:
    tk: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    eog_ids: tuple[int, ...] = ()  # eos_ids plus the vocabulary's other end-of-generation tokens

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where generation of an answer stops: the declared EOS/EOT ids and every end-of-turn control
        token of the vocabulary (EOG_TEXTS)."""
        return tuple(dict.fromkeys([*self.eos_ids, *self.eog_ids]))

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf_reader(cls, reader: Any, path: Path) -> Tokenizer:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as TK

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        tokens = field("tokenizer.ggml.tokens")
        if not tokens:
            raise InputError(f"{path} has no tokenizer in its metadata", "use a GGUF that embeds its tokenizer")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
            tk = TK(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
            pre = field("tokenizer.ggml.pre", "default")
            regexes = PRE_SPLITS.get(pre, PRE_SPLITS["default"])
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tk.decoder = decoders.ByteLevel()
        elif kind == "llama":
            # SentencePiece vocab with scores: a Unigram model with byte fallback reproduces SPM's
            # segmentation for LLaMA-2-style vocabularies.
            from tokenizers import normalizers

            scores = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
            unk = field("tokenizer.ggml.unknown_token_id", 0)
            tk = TK(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk, byte_fallback=True))
            tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                            decoders.Strip(" ", 1, 0)])
        else:
            raise InputError(f"{path} uses tokenizer model {kind!r}", "hotcold reads gpt2 (BPE) and llama (SentencePiece) tokenizers")
        # 3 = CONTROL (special: dropped when decoding with skip_special), 4 = USER_DEFINED (matched whole,
        # kept in decoded text), as llama.cpp and transformers treat them.
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
        bos = field("tokenizer.ggml.bos_token_id")
        eos = field("tokenizer.ggml.eos_token_id")
        eot = field("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(int(x) for x in dict.fromkeys([eos, eot]) if x is not None)
        index = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3 and t in EOG_TEXTS}
        stop = tuple(dict.fromkeys([*eos_ids, *(index[t] for t in EOG_TEXTS if t in index)]))
        return cls(tk=tk, bos_id=None if bos is None else int(bos), eos_ids=eos_ids,
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", kind == "llama")),
                   chat_template=field("tokenizer.chat_template"), eog_ids=stop)

    @classmethod
    def from_hf_dir(cls, d: Path, eos_ids: tuple[int, ...] = ()) -> Tokenizer | None:
        from tokenizers import Tokenizer as TK

        tj = d / "tokenizer.json"
        if not tj.is_file():
            return None
        tk = TK.from_file(str(tj))
        cfg: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text())

        def tok_id(v: Any) -> int | None:
            if isinstance(v, dict):
                v = v.get("content")
            return tk.token_to_id(v) if isinstance(v, str) else None

        bos = tok_id(cfg.get("bos_token"))
        eos = tok_id(cfg.get("eos_token"))
        ids = tuple(dict.fromkeys([*eos_ids, *([eos] if eos is not None else [])]))
        template = cfg.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        # HF tokenizer.json files add BOS through their post-processor; we never add it twice
        # (unless the directory was written by `save`, which records whether we add it).
        return cls(tk=tk, bos_id=bos, eos_ids=ids, add_bos=bool(cfg.get("hotcold_add_bos", False)),
                   chat_template=template)

    def save(self, d: Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json that `from_hf_dir` reads back (e.g. to carry a
        GGUF model's tokenizer, 2 MB, where the model file cannot go)."""
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(d / "tokenizer.json"))
        cfg = {"bos_token": self.token_str(self.bos_id) if self.bos_id is not None else None,
               "eos_token": self.token_str(self.eos_ids[0]) if self.eos_ids else None,
               "chat_template": self.chat_template, "hotcold_add_bos": self.add_bos}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        return d

    # ---- use -----------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=True).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_str(self, i: int) -> str:
        return self.tk.id_to_token(i) or ""

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as HF's apply_chat_template(tokenize=False) does."""
        if not self.chat_template:
            # No template: a plain transcript, so models without one still get a sensible prompt.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.token_str(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.token_str(self.eos_ids[0]) if self.eos_ids else "")
        except TemplateError as e:
            raise InputError(f"the model's chat template failed: {e}", "use --no-chat-template") from None

    def chat_ids(self, user: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.encode(self.render_chat(msgs))


class FoldedTokenizer:
    """Another model's tokenizer lent to a model with a smaller vocabulary (a random 70B-shaped model
    has none): token ids at or above `vocab` fold to id % vocab. Text round-trips only for ids below
    `vocab`; the ids feed the model a realistic token stream (lengths, repetition), which is all a
    random-weight model can use."""

    def __init__(self, base: Tokenizer, vocab: int, description: str):
        self.base = base
        self.vocab = int(vocab)
        self.description = description
        self.eos_ids = tuple(i % self.vocab for i in base.eos_ids)
        self.stop_ids = tuple(dict.fromkeys(i % self.vocab for i in base.stop_ids))
        self.bos_id = None if base.bos_id is None else base.bos_id % self.vocab

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [i % self.vocab for i in self.base.encode(text, add_bos)]

    def chat_ids(self, user: str, system: str | None = None) -> list[int]:
        return [i % self.vocab for i in self.base.chat_ids(user, system)]

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.base.decode(ids, skip_special)

    def __getattr__(self, name: str) -> Any:  # render_chat, token_str, chat_template, add_bos, ...
        return getattr(self.base, name)
