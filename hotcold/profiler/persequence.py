"""Per-sequence activation counts (`profile run --per-sequence`): what the hot-set measurement needs.

A Profile's `active_count_*` arrays sum over every profiled token, which answers "which neurons fire on
this workload" but not "would the prompt's own top set, or an EMA that adapts while generating, have
caught the continuation's activations". With `per_sequence` the profiler also keeps, per sequence:

    prefill   [S, L, F] uint16   active count of every neuron over the sequence's prompt tokens
    tokens    [S, 2]    int64    (prompt tokens, continuation tokens) counted
    blocks    [NB, L, F] uint8   active counts over consecutive blocks of `block` continuation tokens
                                 (the last block of a sequence may be shorter), sequences in order
    block_seq    [NB]   int32    the sequence each block belongs to
    block_tokens [NB]   int32    tokens in the block

written as `sequences.safetensors` (ids and the block size in the manifest's "sequences"). Blocks of
`block` tokens are what the runtime's dynamic mode folds into its EMA (one fold every `every` decode
tokens), so a block size equal to that `every` lets the hot-set measurement replay its rule; summing a
sequence's blocks gives its continuation counts. Counts come from the same active masks the aggregate
counts are summed from, so the per-sequence records add up to `active_count_*` exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hotcold.errors import InputError

DEFAULT_BLOCK = 16  # the runtime's dynamic mode folds its EMA every 16 decode tokens by default
MAX_PREFILL = np.iinfo(np.uint16).max
MAX_BLOCK = np.iinfo(np.uint8).max
KEYS = ("prefill", "tokens", "blocks", "block_seq", "block_tokens")


def check_block(block: int) -> None:
    if not 1 <= block <= MAX_BLOCK:
        raise InputError(f"--per-sequence-block must be in [1, {MAX_BLOCK}], got {block}",
                         f"pass e.g. {DEFAULT_BLOCK} (the dynamic mode's EMA period)")


class SequenceRecorder:
    """One rank's per-sequence counts, filled layer by layer as the FFN hook sees them."""

    def __init__(self, n_layers: int, n_ff: int, block: int):
        check_block(block)
        self.L, self.F, self.block = n_layers, n_ff, block
        self.pre: dict[str, np.ndarray] = {}  # id -> [L, F] uint16
        self.dec: dict[str, np.ndarray] = {}  # id -> [nb, L, F] uint8
        self.tokens: dict[str, tuple[int, int]] = {}

    def begin(self, sid: str, n_prefill: int, n_decode: int | None) -> None:
        """Allocate a sequence's records (idempotent: streaming calls it once per layer). n_decode None:
        not known yet (generate mode), `decode_length` allocates the blocks once it is."""
        if sid in self.tokens:
            return
        if n_prefill > MAX_PREFILL:
            raise InputError(f"prompt {sid} has {n_prefill} tokens; per-sequence counts hold at most {MAX_PREFILL}",
                             "shorten the prompt or drop --per-sequence")
        self.pre[sid] = np.zeros((self.L, self.F), np.uint16)
        self.tokens[sid] = (int(n_prefill), 0)
        if n_decode is not None:
            self.decode_length(sid, n_decode)

    def decode_length(self, sid: str, n_decode: int) -> None:
        self.dec[sid] = np.zeros((-(-n_decode // self.block), self.L, self.F), np.uint8)
        self.tokens[sid] = (self.tokens[sid][0], int(n_decode))

    def add_prefill(self, sid: str, layer: int, active: torch.Tensor) -> None:
        """active [n_prefill, F] bool: this sequence's prompt tokens in `layer`."""
        if active.shape[0]:
            self.pre[sid][layer] += active.sum(0).to(torch.int32).cpu().numpy().astype(np.uint16)

    def add_decode(self, sid: str, layer: int, active: torch.Tensor) -> None:
        """active [n_decode, F] bool: this sequence's continuation tokens in `layer`, in order."""
        n = active.shape[0]
        if not n:
            return
        nb, K = self.dec[sid].shape[0], self.block
        pad = nb * K - n
        a = active if pad == 0 else torch.cat([active, active.new_zeros((pad, active.shape[1]))])
        self.dec[sid][:, layer] += a.view(nb, K, -1).sum(1).to(torch.int32).cpu().numpy().astype(np.uint8)

    # ---- checkpoints (flat arrays + the ids in the checkpoint's JSON metadata) ---------------------
    def state(self) -> tuple[dict[str, np.ndarray], list[str]]:
        ids = list(self.tokens)
        return self._flat(ids), ids

    def load_state(self, t: dict[str, np.ndarray], ids: list[str]) -> None:
        if not ids:
            return
        nblk = np.bincount(t["seq_block_seq"], minlength=len(ids))
        starts = np.concatenate([[0], np.cumsum(nblk)])
        for j, sid in enumerate(ids):
            self.pre[sid] = t["seq_prefill"][j].copy()
            self.dec[sid] = t["seq_blocks"][starts[j]:starts[j + 1]].copy()
            self.tokens[sid] = tuple(int(v) for v in t["seq_tokens"][j])

    def _flat(self, ids: list[str]) -> dict[str, np.ndarray]:
        L, F = self.L, self.F
        if not ids:
            return {"seq_prefill": np.zeros((0, L, F), np.uint16), "seq_tokens": np.zeros((0, 2), np.int64),
                    "seq_blocks": np.zeros((0, L, F), np.uint8), "seq_block_seq": np.zeros(0, np.int32),
                    "seq_block_tokens": np.zeros(0, np.int32)}
        blk_tok = []
        for sid in ids:
            n, K = self.tokens[sid][1], self.block
            blk_tok.extend(min(K, n - j * K) for j in range(self.dec[sid].shape[0]))
        return {"seq_prefill": np.stack([self.pre[s] for s in ids]),
                "seq_tokens": np.asarray([self.tokens[s] for s in ids], np.int64).reshape(-1, 2),
                "seq_blocks": np.concatenate([self.dec[s] for s in ids]),
                "seq_block_seq": np.concatenate([np.full(self.dec[s].shape[0], j, np.int32)
                                                 for j, s in enumerate(ids)]),
                "seq_block_tokens": np.asarray(blk_tok, np.int32)}

    def parts(self) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
        """id -> (prefill, blocks, tokens): what ranks exchange."""
        return {s: (self.pre[s], self.dec[s], self.tokens[s]) for s in self.tokens}

    @classmethod
    def from_parts(cls, n_layers: int, n_ff: int, block: int, parts: list[dict[str, Any]]) -> SequenceRecorder:
        rec = cls(n_layers, n_ff, block)
        for p in parts:
            for sid, (pre, dec, tok) in p.items():
                rec.pre[sid], rec.dec[sid], rec.tokens[sid] = pre, dec, tok
        return rec

    def artifact(self, order: list[str]) -> dict[str, np.ndarray]:
        """The arrays Profile.sequences holds, sequences in `order` (the workload's order)."""
        missing = [s for s in order if s not in self.tokens]
        if missing:
            raise RuntimeError(f"per-sequence records missing for {missing[:3]}")
        flat = self._flat(order)
        return {k[len("seq_"):]: v for k, v in flat.items()}


def decode_counts(seqs: dict[str, np.ndarray]) -> np.ndarray:
    """[S, L, F] int32: each sequence's continuation counts (the sum of its blocks)."""
    S = seqs["prefill"].shape[0]
    out = np.zeros((S, *seqs["blocks"].shape[1:]), np.int32)
    starts = np.searchsorted(seqs["block_seq"], np.arange(S + 1))  # blocks are stored sequence by sequence
    for j in range(S):
        if starts[j + 1] > starts[j]:
            out[j] = seqs["blocks"][starts[j]:starts[j + 1]].sum(0, dtype=np.int32)
    return out


def check_sequences(seqs: dict[str, np.ndarray], n_layers: int, n_ff: int, where: str) -> None:
    """Shapes and dtypes of a loaded sequences.safetensors (hashes are checked by the manifest already)."""
    missing = [k for k in KEYS if k not in seqs]
    if missing:
        raise InputError(f"{where}: sequences.safetensors lacks {', '.join(missing)}",
                         "re-run `hotcold profile run --per-sequence`")
    S, NB = seqs["prefill"].shape[0], seqs["blocks"].shape[0]
    ok = (seqs["prefill"].shape == (S, n_layers, n_ff) and seqs["blocks"].shape == (NB, n_layers, n_ff)
          and seqs["tokens"].shape == (S, 2) and seqs["block_seq"].shape == (NB,)
          and seqs["block_tokens"].shape == (NB,) and (NB == 0 or int(seqs["block_seq"].max()) < S))
    if not ok:
        raise InputError(f"{where}: per-sequence arrays have inconsistent shapes", "re-run the profile")
