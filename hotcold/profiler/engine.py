"""The profiling engine: run a workload through the dense model and count, per layer and neuron, the
tokens on which each FFN neuron is active (activation.py), prefill and decode separately, with |a|
histograms and optional (x, mask) samples.

Modes (design.md §3):
    generate         prompt (prefill), then greedy decoding of up to N tokens, one forward per token;
                     every fed token is counted as decode (what the runtime sees at batch 1)
    teacher-forced   prompt + the reference continuation in one forward, batched (right-padded; padded
                     positions are never counted), prompt tokens as prefill and continuation as decode.
                     `stream=True` runs it layer by layer: every sequence's hidden state goes through
                     layer 0, then layer 1, ..., with one layer's weights resident, so a model larger
                     than memory is profiled on one device. Same batches, same kernels: the counts are
                     identical to the in-memory run.

Counting happens in the model's FFN hook (dense.py), never by patching forward. In generate mode the
decode steps' activations are kept per prompt and counted in one vectorised pass after it, which keeps
the per-token overhead to a list append per layer.

Magnitude thresholds for a target sparsity are calibrated first on the first `calibration_prompts`
prompts (same mode, |a| histograms only, inverse CDF per layer: artifact.threshold_from_hist); in
streaming mode calibration runs layer by layer inside the same pass. Default: 4 prompts in generate mode
(each costs a full generation; 4 MBPP prompts give ~1.5k tokens x n_ff |a| values per layer, far more
than a quantile needs) and 16 in teacher-forced mode (one batched forward).

Resumable: every `checkpoint_every` prompts each rank writes its partial counts into `.<out name>.checkpoint/`
beside the output (one file per rank, replaced atomically; calibrated thresholds in calibration.json); a
re-run with the same inputs and options continues from it (another run's checkpoint is refused), and
the checkpoint is removed once the Profile is written. The Profile itself is written to a temporary
directory and renamed into place, so an interrupted run never leaves a half-written Profile.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hotcold.devices import torch_dtypes
from hotcold.artifacts import sha256_json
from hotcold.errors import InputError
from hotcold.model.weights import WeightSource
from hotcold.profiler.activation import HISTOGRAM, ActivationSpec, hist_index, manifest_entry
from hotcold.profiler.artifact import Profile, threshold_from_hist
from hotcold.profiler.dist import DistContext, init_distributed
from hotcold.profiler.persequence import DEFAULT_BLOCK, SequenceRecorder, check_block
from hotcold.profiler.sampling import Sampler, SampleSet, Window
from hotcold.profiler.sequences import MODES, PromptTokens, encode_tasks, fit_context, sequences_digest, tokenizer_for

NB = HISTOGRAM["bins"] + 2  # histogram bins per layer (under, log-spaced, over)
PREFILL, DECODE = 0, 1
DEFAULT_CHECKPOINT_EVERY = 16  # prompts; a checkpoint costs one small file write
DEFAULT_CALIBRATION = {"generate": 4, "teacher-forced": 16}  # prompts (see the module docstring)
DTYPES = torch_dtypes()  # canonical name -> torch dtype (hotcold.devices)
CHECKPOINT_VERSION = 1

# (prompts done, prompts total, tokens done) on this rank
ProgressFn = Callable[[float, int, int], None]


@dataclass(frozen=True)
class ProfileOptions:
    mode: str = "generate"
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    max_new_tokens: int = 64  # generate mode
    stream: bool = False  # teacher-forced only: layer by layer, one layer resident
    batch_size: int = 8  # teacher-forced sequences per forward
    prompt_format: str = "chat"  # chat | raw (hotcold.workloads.format_prompt)
    calibration_prompts: int | None = None  # --sparsity calibration prompts; None: DEFAULT_CALIBRATION[mode]
    samples: int = 0  # (x, mask) token positions to keep for predictor training
    seed: int = 0  # sample selection
    checkpoint_every: int | None = None  # prompts; None: DEFAULT_CHECKPOINT_EVERY (stream: one pass)
    checkpoint_dir: Path | None = None  # None: beside --out
    resume: bool = True
    device: str = "cpu"  # cpu | cuda | auto (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "float32"
    keep_tokens: bool = False  # return generated token ids (generate mode) in RunResult
    per_sequence: bool = False  # also keep per-sequence counts (persequence.py), sequences.safetensors
    per_sequence_block: int = DEFAULT_BLOCK  # continuation tokens per block of the per-sequence records

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}", f"use one of: {', '.join(MODES)}")
        if self.stream and self.mode != "teacher-forced":
            raise InputError("--stream (layer by layer) needs --mode teacher-forced",
                             "add --mode teacher-forced, or drop --stream")
        if self.mode == "generate" and self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}", "pass e.g. 64")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}", "pass e.g. 8")
        if self.calibration_prompts is not None and self.calibration_prompts < 1:
            raise InputError(f"--calibration-prompts must be >= 1, got {self.calibration_prompts}", "pass e.g. 4")
        if self.samples < 0:
            raise InputError(f"--samples must be >= 0, got {self.samples}", "pass 0 for none")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise InputError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}", "pass e.g. 16")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}", f"use one of: {', '.join(DTYPES)}")
        if self.per_sequence:
            check_block(self.per_sequence_block)


@dataclass
class RunResult:
    profile: Profile
    path: Path | None  # where rank 0 wrote it (None when not saved, and on other ranks)
    prompts: int  # profiled on this rank
    resumed_from: int  # prompts already done (from a checkpoint) when this run started, this rank
    elapsed_s: float
    calibration_s: float
    generated: dict[str, list[int]] = field(default_factory=dict)  # keep_tokens: id -> new token ids
    rank: int = 0
    world: int = 1


# ---- counting --------------------------------------------------------------------------------------

class Stats:
    """Running counts of one rank: count [2, L, F] and hist [2, L, NB] (phase 0 prefill, 1 decode)."""

    def __init__(self, n_layers: int, n_ff: int, device: torch.device):
        self.count = torch.zeros((2, n_layers, n_ff), dtype=torch.int64, device=device)
        self.hist = torch.zeros((2, n_layers, NB), dtype=torch.int64, device=device)
        self.tokens = [0, 0]

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count.cpu().numpy(), "hist": self.hist.cpu().numpy(),
                "tokens": np.asarray(self.tokens, np.int64)}

    def load_state(self, t: dict[str, np.ndarray]) -> None:
        self.count.copy_(torch.from_numpy(t["count"]))
        self.hist.copy_(torch.from_numpy(t["hist"]))
        self.tokens = [int(v) for v in t["tokens"]]


class Rule:
    """The activation definition with resolved thresholds: active(layer, x, a) -> bool [N, F]."""

    def __init__(self, kind: str, thresholds: list[float] | None, gate_weight: Callable[[int], torch.Tensor]):
        self.kind = kind
        self.thresholds = thresholds
        self.gate_weight = gate_weight  # layer -> W_gate [F, D] of the resident layer

    @property
    def needs_x(self) -> bool:
        return self.kind == "sign"

    def active(self, layer: int, x2d: torch.Tensor | None, a2d: torch.Tensor,
               abs_a: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "product":
            return (a2d.abs() if abs_a is None else abs_a) > self.thresholds[layer]
        if self.kind == "sign":
            return F.linear(x2d, self.gate_weight(layer)) > 0
        return a2d != 0  # relu


class Observer:
    """What the FFN hook feeds: counts under `rule` (None: histograms only, for calibration), and with a
    SequenceRecorder (`rec`) the per-sequence counts too."""

    def __init__(self, stats: Stats, rule: Rule | None, rec: SequenceRecorder | None = None):
        self.stats, self.rule, self.rec = stats, rule, rec

    def observe(self, layer: int, phase: int, x2d: torch.Tensor | None, a2d: torch.Tensor) -> torch.Tensor | None:
        """Count rows a2d [N, F] (x2d [N, D] for the gate rule); returns the active mask [N, F] (None
        without a rule or rows)."""
        if a2d.shape[0] == 0:
            return None
        abs_a = a2d.abs()
        active = None
        if self.rule is not None:
            active = self.rule.active(layer, x2d, a2d, abs_a)
            self.stats.count[phase, layer] += active.sum(0)
        self.stats.hist[phase, layer] += torch.bincount(hist_index(abs_a, inplace=True), minlength=NB)
        return active


class _LayerCache:
    """The KV cache of one layer only (streaming): block_forward indexes cache.k[layer]."""

    def __init__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = {layer: k}, {layer: v}


@dataclass
class _Batch:
    seqs: list[PromptTokens]
    tokens: torch.Tensor  # [B, T], right-padded with 0
    pre_rows: torch.Tensor  # flat indices into B*T of prompt positions
    dec_rows: torch.Tensor  # ... of continuation positions

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def entries(self) -> list[tuple[str, int, int, int]]:
        T = self.tokens.shape[1]
        return [(s.id, len(s.prompt), len(s), b * T) for b, s in enumerate(self.seqs)]


def make_batches(seqs: Sequence[PromptTokens], batch_size: int, device: torch.device) -> list[_Batch]:
    """Teacher-forced batches: longest first (so a too-large batch fails at once), ties by input order.

    Depends only on the sequences and batch_size, so the streaming and in-memory runs see identical
    batches (and therefore bit-identical activations).
    """
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    out = []
    for j in range(0, len(order), batch_size):
        group = [seqs[i] for i in order[j:j + batch_size]]
        T = max(len(s) for s in group)
        tokens = torch.zeros((len(group), T), dtype=torch.int64)
        plen = torch.tensor([len(s.prompt) for s in group])
        slen = torch.tensor([len(s) for s in group])
        for b, s in enumerate(group):
            tokens[b, :len(s)] = torch.tensor(s.prompt + s.continuation)
        pos = torch.arange(T)[None, :]
        pre = (pos < plen[:, None]).reshape(-1)
        dec = ((pos >= plen[:, None]) & (pos < slen[:, None])).reshape(-1)
        out.append(_Batch(group, tokens.to(device), pre.nonzero().squeeze(1).to(device),
                          dec.nonzero().squeeze(1).to(device)))
    return out


# ---- checkpoints -------------------------------------------------------------------------------------

class Checkpoint:
    """One file per rank, `rank{r}-of-{w}.safetensors` (tensors + JSON metadata), replaced atomically;
    `calibration.json` holds calibrated thresholds (identical on every rank, written by rank 0)."""

    def __init__(self, directory: Path | None, run_key: str, ctx: DistContext):
        self.dir = directory
        self.run_key = run_key
        self.ctx = ctx
        self.file = None if directory is None else directory / f"rank{ctx.rank}-of-{ctx.world}.safetensors"

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def discard(self) -> None:
        """Rank 0 removes any previous checkpoint (--no-resume); every rank waits for it."""
        if self.enabled and self.ctx.is_main and self.dir.exists():
            shutil.rmtree(self.dir)
        self.ctx.barrier()

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        if not self.enabled:
            return None
        if not self.file.is_file():
            others = sorted(p.name for p in self.dir.glob("rank*-of-*.safetensors")) if self.dir.is_dir() else []
            if others and not any(n.endswith(f"-of-{self.ctx.world}.safetensors") for n in others):
                raise InputError(f"checkpoint {self.dir} was written by a run with another number of processes "
                                 f"({others[0]}; this run has {self.ctx.world})",
                                 "re-run with the same number of processes (torchrun --nproc-per-node), "
                                 "or pass --no-resume to start over")
            return None
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from safetensors import safe_open

        try:
            with safe_open(str(self.file), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("hotcold", "{}"))
            tensors = load_file(str(self.file))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"checkpoint {self.file} is unreadable ({e})",
                             "pass --no-resume to discard it and start over") from None
        if meta.get("version") != CHECKPOINT_VERSION or meta.get("run_key") != self.run_key:
            raise InputError(f"checkpoint {self.dir} belongs to a different run (other model, prompts or options)",
                             "re-run with the same options to resume it, or pass --no-resume to start over")
        return tensors, meta

    def save(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.tmp-{os.getpid()}")
        body = {"version": CHECKPOINT_VERSION, "run_key": self.run_key, **meta}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata={"hotcold": json.dumps(body)})
        os.replace(tmp, self.file)

    def load_thresholds(self) -> list[float] | None:
        """Calibrated thresholds from an earlier attempt, agreed on by every rank (or None)."""
        found = None
        if self.enabled and (self.dir / "calibration.json").is_file():
            try:
                d = json.loads((self.dir / "calibration.json").read_text())
                if d.get("run_key") == self.run_key:
                    found = [float(t) for t in d["thresholds"]]
            except (ValueError, KeyError, TypeError):
                found = None
        if self.ctx.all_sum(int(found is not None)) != self.ctx.world:
            return None
        return found

    def save_thresholds(self, thresholds: list[float]) -> None:
        if self.enabled and self.ctx.is_main:
            from hotcold.artifacts import atomic_write_text

            atomic_write_text(self.dir / "calibration.json",
                              json.dumps({"run_key": self.run_key, "thresholds": thresholds}))

    def remove(self) -> None:
        """After the Profile is written: every rank removes its file, then rank 0 the directory."""
        if not self.enabled:
            return
        self.file.unlink(missing_ok=True)
        self.ctx.barrier()
        if self.ctx.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)


def default_checkpoint_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


# ---- the engine -----------------------------------------------------------------------------------

class Engine:
    """One rank's profiling loop over its shard, with the model in memory or streamed layer by layer."""

    def __init__(self, src: WeightSource, opts: ProfileOptions, ctx: DistContext, model: Any = None,
                 eos_ids: Sequence[int] = ()):
        self.src = src
        self.cfg = src.config
        self.opts = opts
        self.ctx = ctx
        self.device = ctx.device
        self.dtype = DTYPES[opts.dtype]
        self.eos_ids = tuple(eos_ids)
        self._model = model
        self._stream_layer: Any = None  # the resident LayerWeights while streaming

    # -- model access
    @property
    def model(self) -> Any:
        if self._model is None:
            from hotcold.model.dense import DenseModel

            self._model = DenseModel.from_source(self.src, dtype=self.dtype, device=self.device)
        return self._model

    @property
    def max_len(self) -> int:
        return self._model.max_len if self._model is not None else self.cfg.max_seq_len

    def gate_weight(self, layer: int) -> torch.Tensor:
        lw = self._stream_layer if self.opts.stream else self.model.layers[layer]
        return lw.w_gate_up[:self.cfg.n_ff]

    def rule(self, kind: str, thresholds: list[float] | None) -> Rule:
        return Rule(kind, thresholds, self.gate_weight)

    # -- generate mode
    def generate_one(self, seq: PromptTokens, obs: Observer, window: Window | None) -> list[int]:
        """Prefill `seq.prompt`, decode up to max_new_tokens greedily, count every forwarded token."""
        from hotcold.model.generate import generate

        model, L = self.model, self.cfg.n_layers
        T = len(seq.prompt)
        max_new = max(1, min(self.opts.max_new_tokens, model.max_len - T))
        rule = obs.rule
        keep_x = (rule is not None and rule.needs_x) or window is not None
        phase = [PREFILL]
        dec_a: list[list[torch.Tensor]] = [[] for _ in range(L)]
        dec_x: list[list[torch.Tensor]] = [[] for _ in range(L)]

        rec = obs.rec if rule is not None else None
        if rec is not None:
            rec.begin(seq.id, T, None)  # decode tokens are known after generation: blocks allocated then

        def hook(layer: int, x: torch.Tensor, a: torch.Tensor) -> None:
            if phase[0] == PREFILL:
                act = obs.observe(layer, PREFILL, x[0], a[0])
                if rec is not None and act is not None:
                    rec.add_prefill(seq.id, layer, act)
                if window is not None:
                    window.capture(layer, x[0], rule.active, a[0], 0)
            else:  # counted after the prompt, in one pass (per-token cost: two list appends)
                dec_a[layer].append(a[0, 0])
                if keep_x:
                    dec_x[layer].append(x[0, 0])

        def on_token(_tok: int) -> None:
            phase[0] = DECODE

        g = generate(model, list(seq.prompt), max_new, eos_ids=self.eos_ids, on_token=on_token,
                     forward_kw={"hook": hook})
        n_dec = len(dec_a[0])
        if rec is not None:
            rec.decode_length(seq.id, n_dec)
        for layer in range(L if n_dec else 0):
            a2d = torch.stack(dec_a[layer])
            x2d = torch.stack(dec_x[layer]) if keep_x else None
            act = obs.observe(layer, DECODE, x2d, a2d)
            if rec is not None:
                rec.add_decode(seq.id, layer, act)
            if window is not None:
                window.capture(layer, x2d, rule.active, a2d, T)
        obs.stats.tokens[PREFILL] += T
        obs.stats.tokens[DECODE] += n_dec
        return g.new_ids

    def potential_positions(self, seq: PromptTokens) -> int:
        """Positions generate mode may forward for `seq` (the last sampled token is never fed)."""
        return len(seq.prompt) + max(1, min(self.opts.max_new_tokens, self.max_len - len(seq.prompt))) - 1

    # -- teacher-forced, in memory
    def batch_hook(self, batch: _Batch, obs: Observer, window: Window | None):
        D, Fn = self.cfg.dim, self.cfg.n_ff
        need_x = obs.rule is not None and obs.rule.needs_x
        rec = obs.rec if obs.rule is not None else None
        if rec is not None:  # rows of a phase are sorted by (sequence, position): one segment per sequence
            seg = {PREFILL: [len(s.prompt) for s in batch.seqs], DECODE: [len(s.continuation) for s in batch.seqs]}
            for s in batch.seqs:
                rec.begin(s.id, len(s.prompt), len(s.continuation))

        def hook(layer: int, x: torch.Tensor, a: torch.Tensor) -> None:
            x2, a2 = x.reshape(-1, D), a.reshape(-1, Fn)
            for phase, rows in ((PREFILL, batch.pre_rows), (DECODE, batch.dec_rows)):
                if rows.numel():
                    act = obs.observe(layer, phase, x2[rows] if need_x else None, a2[rows])
                    if rec is not None:
                        add = rec.add_prefill if phase == PREFILL else rec.add_decode
                        for s, part in zip(batch.seqs, torch.split(act, seg[phase])):
                            add(s.id, layer, part)
            if window is not None:
                window.capture(layer, x2, obs.rule.active, a2, 0)

        return hook

    def forward_batch(self, batch: _Batch, obs: Observer, window: Window | None) -> None:
        model = self.model
        B, T = batch.shape
        model.forward(batch.tokens, 0, model.new_cache(B, T), hook=self.batch_hook(batch, obs, window),
                      last_only=True)
        self.count_tokens(batch, obs)

    @staticmethod
    def count_tokens(batch: _Batch, obs: Observer) -> None:
        obs.stats.tokens[PREFILL] += int(batch.pre_rows.numel())
        obs.stats.tokens[DECODE] += int(batch.dec_rows.numel())

    # -- teacher-forced, layer by layer
    def stream(self, batches: list[_Batch], obs: Observer, windows: list[Window | None],
               calib: tuple[list[_Batch], Observer, Callable[[int, torch.Tensor], float]] | None,
               on_layer: Callable[[int], None]) -> None:
        """Every batch through layer 0, then layer 1, ...; one layer's weights resident at a time.

        calib: (calibration batches, their histogram-only observer, finish(layer, hist) -> t_l): the
        layer's threshold is calibrated on those batches before the layer counts the main batches.
        """
        from hotcold.model.dense import LayerWeights, Rope, block_forward

        cfg, dev, dt = self.cfg, self.device, self.dtype
        embed = self.src.embedding(dt).to(dev)
        hs = [F.embedding(b.tokens, embed) for b in batches]
        cal_hs = [F.embedding(b.tokens, embed) for b in calib[0]] if calib else []
        del embed
        rope = Rope(cfg, self.max_len, dev)
        for layer in range(cfg.n_layers):
            lw = LayerWeights.from_tensors(self.src.layer(layer, dt)).to(dev).for_decode()
            self._stream_layer = lw
            if calib is not None:
                cal_batches, cal_obs, finish = calib
                for i, b in enumerate(cal_batches):
                    cal_hs[i] = block_forward(cfg, layer, lw, cal_hs[i], 0, rope, self._layer_cache(layer, b),
                                              self.batch_hook(b, cal_obs, None))
                obs.rule.thresholds[layer] = finish(layer, cal_obs.stats.hist[:, layer].sum(0))
            for i, b in enumerate(batches):
                hs[i] = block_forward(cfg, layer, lw, hs[i], 0, rope, self._layer_cache(layer, b),
                                      self.batch_hook(b, obs, windows[i]))
            self._stream_layer = None
            del lw
            on_layer(layer)
        for b in batches:
            self.count_tokens(b, obs)

    def _layer_cache(self, layer: int, batch: _Batch) -> _LayerCache:
        B, T = batch.shape
        shape = (B, self.cfg.n_kv_heads, T, self.cfg.head_dim)
        return _LayerCache(layer, torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))


# ---- the run --------------------------------------------------------------------------------------

def run_profile(source: WeightSource | str, workload: Any, opts: ProfileOptions | None = None, *,
                out: str | Path | None = None, progress: ProgressFn | None = None, model: Any = None,
                dataset_info: dict[str, Any] | None = None) -> RunResult:
    """Profile `workload` on `source` and return (and, with `out`, write) a Profile.

    workload: a hotcold.workloads.Dataset (tasks are formatted and tokenized here) or a sequence of
    PromptTokens. model: an already loaded DenseModel of `source` to reuse (in-memory modes).
    Under torchrun every rank calls this; prompts are sharded by rank, counts all-reduced, rank 0 writes.
    """
    from hotcold.model.registry import load_source

    opts = opts or ProfileOptions()
    opts.validate()
    src = load_source(source) if isinstance(source, (str, Path)) else source
    cfg = src.config
    opts.activation.check_model(cfg)
    if model is not None and model.cfg.shape_key() != cfg.shape_key():
        raise InputError("the model passed does not match the weight source", "pass the DenseModel of this source")
    tok = tokenizer_for(src)
    if isinstance(workload, (list, tuple)) and all(isinstance(s, PromptTokens) for s in workload):
        seqs = list(workload)
        dataset = dataset_info or {"name": "sequences", "kind": "sequences"}
    else:
        seqs = encode_tasks(workload.tasks, tok, opts.mode, opts.prompt_format)
        dataset = {**workload.describe(), **(dataset_info or {})}
    if not seqs:
        raise InputError("no prompts to profile", "check --dataset, --split, --offset and --limit")
    if opts.mode == "teacher-forced" and not any(s.continuation for s in seqs):
        raise InputError("teacher-forced mode needs reference continuations and none of the prompts has one",
                         "use a dataset with reference code (mbpp, embedded) or --mode generate")
    max_len = model.max_len if model is not None else cfg.max_seq_len
    seqs, cut = fit_context(seqs, max_len, opts.mode, opts.max_new_tokens)
    dataset.update(n_prompts=len(seqs), prompt_format=opts.prompt_format)

    ctx = init_distributed(opts.device)
    try:
        return _run(src, seqs, opts, ctx, Path(out) if out is not None else None, progress, model, dataset, cut,
                    tuple(getattr(tok, "eos_ids", ()) or cfg.eos_token_ids))
    finally:
        ctx.close()


def _run(src: WeightSource, seqs: list[PromptTokens], opts: ProfileOptions, ctx: DistContext, out: Path | None,
         progress: ProgressFn | None, model: Any, dataset: dict[str, Any], cut: int,
         eos_ids: tuple[int, ...]) -> RunResult:
    t_start = time.perf_counter()
    cfg = src.config
    L, Fn = cfg.n_layers, cfg.n_ff
    spec = opts.activation
    every = opts.checkpoint_every or (None if opts.stream else DEFAULT_CHECKPOINT_EVERY)
    shard = seqs[ctx.rank::ctx.world]
    n_cal = min(opts.calibration_prompts or DEFAULT_CALIBRATION[opts.mode], len(seqs))
    run_key = sha256_json({
        "model": src.fingerprint, "sequences": sequences_digest(seqs), "mode": opts.mode,
        "activation": spec.to_json(), "max_new_tokens": opts.max_new_tokens if opts.mode == "generate" else None,
        "batch_size": opts.batch_size if opts.mode == "teacher-forced" else None, "stream": opts.stream,
        "calibration_prompts": n_cal if spec.needs_calibration else None, "samples": opts.samples,
        "seed": opts.seed, "dtype": opts.dtype, "world": ctx.world,
        **({"per_sequence_block": opts.per_sequence_block} if opts.per_sequence else {})})
    ckdir = opts.checkpoint_dir or (default_checkpoint_dir(out) if out is not None else None)
    ckpt = Checkpoint(ckdir, run_key, ctx)
    if not opts.resume:
        ckpt.discard()
    engine = Engine(src, opts, ctx, model, eos_ids)
    stats = Stats(L, Fn, ctx.device)
    sampler = Sampler(opts.samples, opts.seed, L, cfg.dim, Fn, ctx.device)
    rec = None
    if opts.per_sequence:
        ids = [s.id for s in seqs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"--per-sequence needs unique prompt ids; {dup!r} occurs more than once",
                             "deduplicate the workload")
        rec = SequenceRecorder(L, Fn, opts.per_sequence_block)
    loaded = ckpt.load()
    done = 0  # units done on this rank: prompts (generate) or batches (teacher-forced)
    if loaded is not None:
        tensors, meta = loaded
        stats.load_state(tensors)
        sampler.load_state(tensors)
        if rec is not None:
            rec.load_state(tensors, meta.get("seq_ids") or [])
        done = int(meta["done"])
    batches = make_batches(shard, opts.batch_size, ctx.device) if opts.mode == "teacher-forced" else []
    if opts.mode == "teacher-forced":
        sampler.preselect([(s.id, len(s)) for s in shard])
    resumed_prompts = done if opts.mode == "generate" else sum(len(b.seqs) for b in batches[:done])

    calibration_s = 0.0
    calib_meta: dict[str, Any] | None = None
    if not opts.stream:
        engine.model  # noqa: B018 - load the weights now, so that calibration time is calibration alone
    with torch.inference_mode():
        # ---- thresholds
        thresholds: list[float] | None
        stream_calib = None
        if spec.needs_calibration:
            calib_meta = {"prompts": n_cal, "ids": [s.id for s in seqs[:n_cal]], "phase": "all",
                          "target_sparsity": spec.target_sparsity, "method": "inverse CDF of |a| histogram"}
            thresholds = ckpt.load_thresholds()
            if thresholds is None:
                t0 = time.perf_counter()
                cal_shard = seqs[:n_cal][ctx.rank::ctx.world]
                cal_obs = Observer(Stats(L, Fn, ctx.device), None)

                def finish(layer: int, hist: torch.Tensor) -> float:
                    hist = ctx.all_reduce_(hist.clone())
                    return threshold_from_hist(hist.cpu().numpy(), spec.target_sparsity, **HISTOGRAM)

                if opts.stream:
                    stream_calib = (make_batches(cal_shard, opts.batch_size, ctx.device), cal_obs, finish)
                    thresholds = [float("nan")] * L  # filled layer by layer in the first streaming pass
                else:
                    if opts.mode == "generate":
                        for s in cal_shard:
                            engine.generate_one(s, cal_obs, None)
                    else:
                        for b in make_batches(cal_shard, opts.batch_size, ctx.device):
                            engine.forward_batch(b, cal_obs, None)
                    thresholds = [finish(layer, cal_obs.stats.hist[:, layer].sum(0)) for layer in range(L)]
                    ckpt.save_thresholds(thresholds)
                calibration_s = time.perf_counter() - t0
        else:
            thresholds = spec.layer_thresholds(cfg)
        rule = engine.rule(spec.kind, thresholds)
        obs = Observer(stats, rule, rec)

        # ---- the counting pass
        generated: dict[str, list[int]] = {}
        total = len(shard)
        n_done = resumed_prompts
        since = 0

        def tick(prompts: float, pending_tokens: float = 0.0) -> None:
            if progress is not None:
                progress(prompts, total, stats.tokens[PREFILL] + stats.tokens[DECODE] + int(pending_tokens))

        def checkpoint(units: int) -> None:
            state = {**stats.state(), **sampler.state()}
            meta = {"done": units, "rank": ctx.rank, "world": ctx.world}
            if rec is not None:
                seq_state, seq_ids = rec.state()
                state.update(seq_state)
                meta["seq_ids"] = seq_ids
            ckpt.save(state, meta)

        tick(n_done)
        if opts.mode == "generate":
            for i in range(done, len(shard)):
                s = shard[i]
                window = sampler.window([(s.id, len(s.prompt), engine.potential_positions(s), 0)])
                new = engine.generate_one(s, obs, window)
                sampler.absorb(window)
                if opts.keep_tokens:
                    generated[s.id] = new
                n_done += 1
                since += 1
                tick(n_done)
                if every is not None and since >= every and i + 1 < len(shard):
                    checkpoint(i + 1)
                    since = 0
        elif not opts.stream:
            for i in range(done, len(batches)):
                b = batches[i]
                window = sampler.window(b.entries())
                engine.forward_batch(b, obs, window)
                sampler.absorb(window)
                n_done += len(b.seqs)
                since += len(b.seqs)
                tick(n_done)
                if every is not None and since >= every and i + 1 < len(batches):
                    checkpoint(i + 1)
                    since = 0
        else:
            chunks = _chunks(batches, done, every)
            if stream_calib is not None and not chunks:
                chunks = [(done, done)]  # every rank takes part in the per-layer calibration collectives
            for lo, hi in chunks:
                part = batches[lo:hi]
                windows = [sampler.window(b.entries()) for b in part]
                n_part = sum(len(b.seqs) for b in part)
                t_part = sum(int(b.pre_rows.numel() + b.dec_rows.numel()) for b in part)
                engine.stream(part, obs, windows, stream_calib,  # progress: the pass's share of layers done
                              lambda layer, base=n_done, n=n_part, t=t_part: tick(base + n * (layer + 1) / L,
                                                                                   t * (layer + 1) / L))
                if stream_calib is not None:
                    ckpt.save_thresholds(list(rule.thresholds))
                    stream_calib = None
                for w in windows:
                    sampler.absorb(w)
                n_done += n_part
                tick(n_done)
                if every is not None and hi < len(batches):
                    checkpoint(hi)
            thresholds = rule.thresholds

        # ---- reduce over ranks, write
        count = ctx.all_reduce_(stats.count.clone()).cpu().numpy()
        hist = ctx.all_reduce_(stats.hist.clone()).cpu().numpy()
        tokens = ctx.all_reduce_(torch.tensor(stats.tokens, dtype=torch.int64)).tolist()
    samples: dict[str, np.ndarray] = {}
    if opts.samples:
        parts = ctx.all_gather_object(sampler.kept)
        samples = SampleSet.concat(parts).bottom(opts.samples).artifact()
    sequences: dict[str, np.ndarray] = {}
    if rec is not None:
        parts = ctx.all_gather_object(rec.parts()) if ctx.world > 1 else [rec.parts()]
        sequences = SequenceRecorder.from_parts(L, Fn, opts.per_sequence_block, parts).artifact([s.id for s in seqs])
    elapsed = time.perf_counter() - t_start
    manifest = {
        "model": src.manifest_entry(),
        "dataset": dataset,
        "mode": opts.mode,
        "generation": {"max_new_tokens": opts.max_new_tokens, "greedy": True} if opts.mode == "generate"
        else {"batch_size": opts.batch_size, "stream": opts.stream},
        "activation": manifest_entry(spec.kind, thresholds, spec.target_sparsity),
        "calibration": calib_meta,
        "token_count": {"prefill": int(tokens[PREFILL]), "decode": int(tokens[DECODE])},
        "histogram": dict(HISTOGRAM),
        "samples": {"n": int(len(samples.get("phase", []))), "seed": opts.seed} if opts.samples else None,
        **({"sequences": {"n": len(seqs), "block": opts.per_sequence_block, "ids": [s.id for s in seqs]}}
           if rec is not None else {}),
        "run": {"world_size": ctx.world, "device": str(ctx.device), "dtype": opts.dtype, "truncated_prompts": cut,
                "elapsed_s": round(elapsed, 3), "calibration_s": round(calibration_s, 3)},
    }
    profile = Profile(manifest=manifest, active_count_prefill=count[PREFILL], active_count_decode=count[DECODE],
                      hist_prefill=hist[PREFILL], hist_decode=hist[DECODE], samples=samples,
                      sequences=sequences)
    path = None
    if out is not None and ctx.is_main:
        path = profile.save(out)
        profile = replace(profile, path=path, manifest=json.loads((path / "manifest.json").read_text()))
    ctx.barrier()
    ckpt.remove()
    return RunResult(profile=profile, path=path, prompts=len(shard), resumed_from=resumed_prompts,
                     elapsed_s=elapsed, calibration_s=calibration_s, generated=generated, rank=ctx.rank,
                     world=ctx.world)


def _chunks(batches: list[_Batch], start: int, every: int | None) -> list[tuple[int, int]]:
    """Streaming passes: consecutive batches holding at least `every` prompts (all when None)."""
    out, lo, n = [], start, 0
    for i in range(start, len(batches)):
        n += len(batches[i].seqs)
        if every is not None and n >= every:
            out.append((lo, i + 1))
            lo, n = i + 1, 0
    if lo < len(batches):
        out.append((lo, len(batches)))
    return out


def profile_dataset(model: str | WeightSource, dataset: str = "mbpp", split: str | None = None, *,
                    limit: int | None = None, offset: int = 0, strict: bool = False,
                    opts: ProfileOptions | None = None, out: str | Path | None = None,
                    progress: ProgressFn | None = None) -> RunResult:
    """Convenience: load a dataset spec (hotcold.workloads.load_dataset) and profile it."""
    from hotcold.workloads import load_dataset

    ds = load_dataset(dataset, split, limit=limit, offset=offset, strict=strict)
    return run_profile(model, ds, opts, out=out, progress=progress)
