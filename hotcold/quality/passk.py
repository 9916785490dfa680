"""pass@1 as a user runs it: greedy answers to a task list, generated many tasks per forward, each
answer's code run against the task's tests in the sandbox, with a 95% interval.

    result = run_pass1(model, tokenizer, tasks, Pass1Config(max_new_tokens=384, batch_size=8), out=Path("p.json"))

* prompt: the model's chat template around one user turn (`workloads.pass1_message`: MBPP's task text
  and its test asserts; HumanEval's instruction prompt), no system message of ours;
* generation: greedy, at most `max_new_tokens`, stopping at an end-of-turn token, as soon as the
  answer's first fenced code block is closed (nothing after it is used), or when that block, after a
  definition, starts a top-level test or example line (assert, print, `if __name__`, `# Test`); tasks are sorted by prompt
  length and batched `batch_size` at a time (left padding, masked: `generate_batch`);
* scoring: the code of the first fenced block (`quality.extract`), reduced to its imports,
  definitions and constant assignments (`definitions_only`: the answer's own example calls and copied
  asserts are dropped, as EvalPlus sanitizes), for HumanEval preceded by the prompt's imports, run
  with the task's tests in the sandbox (`quality.sandbox`);
* resumable: every `checkpoint_every` tasks the finished tasks are written to `<out>.partial.json`
  (temp file + rename); a run started again with the same model and settings skips them. The result
  JSON holds every task's status, answer and code, the pass rate with Wilson and Clopper-Pearson 95%
  intervals, and the throughput (tasks per minute, generated tokens per second) of this run.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hotcold.errors import IncompatibleError, InputError

FORMAT = "hotcold.pass1/1"
# A fenced block that has been closed: an opening fence line, then a fence at the start of a later line.
_CLOSED_FENCE = re.compile(r"^[ \t]*```[^\n]*\n.*?^[ \t]*```", re.S | re.M)
# Inside the first code block, after a definition: a top-level line that starts testing or using it
# (the answer copying the prompt's asserts, printing examples). definitions_only() drops those lines,
# so generating them is wasted: the answer stops there.
_TEST_AFTER_DEF = re.compile(r"^[ \t]*```[^\n]*\n(?:(?!^[ \t]*```).)*?^(?:async def |def |class )(?:(?!^[ \t]*```).)*?"
                             r"^(?:assert\b|print\(|if __name__|#\s*(?:[Tt]est|[Ee]xample|[Uu]sage|[Cc]heck))", re.S | re.M)
_IMPORT = re.compile(r"^(?:import [\w., ]+|from [\w.]+ import [\w., ()*]+)$", re.M)


@dataclass(frozen=True)
class Pass1Config:
    max_new_tokens: int = 512
    batch_size: int = 8
    # at most this many KV-cache slots per batch (rows x (longest prompt + max_new_tokens)): a few MBPP
    # prompts run to thousands of tokens (mbpp/493: 3742 with Qwen's tokenizer) and go in smaller batches
    max_batch_tokens: int = 16384
    checkpoint_every: int = 16  # tasks
    # Tasks are taken in their order, `window` at a time, and sorted by prompt length within a window
    # (similar lengths batch with little padding): a run stopped early has covered a prefix of the task
    # list (plus part of one window), not a length-biased subset.
    window: int = 64
    stop_at_fence: bool = True  # stop once the first code block is closed or starts testing its definitions
    sandbox_workers: int = 2
    timeout_s: float = 20.0  # per task, in the sandbox (SandboxLimits' default)

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "max_batch_tokens", "checkpoint_every", "window", "sandbox_workers"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}",
                                 "pass a positive number")


@dataclass
class TaskResult:
    id: str
    status: str  # pass | fail | timeout | oom | error (sandbox.STATUSES)
    passed: bool
    detail: str
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # eos | length | stopped (first code block closed)
    extraction: str  # how the code was found: fence | unfenced | begin-done | empty
    answer: str
    code: str


@dataclass
class Pass1Result:
    header: dict[str, Any]
    tasks: list[TaskResult] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)  # per (re)started run: tasks, seconds

    @property
    def n(self) -> int:
        return len(self.tasks)

    @property
    def passed(self) -> int:
        return sum(t.passed for t in self.tasks)

    def summary(self) -> dict[str, Any]:
        from hotcold.quality.sandbox import STATUSES

        n, k = self.n, self.passed
        by_status = dict.fromkeys(STATUSES, 0)
        for t in self.tasks:
            by_status[t.status] = by_status.get(t.status, 0) + 1
        gen_s = sum(s["generate_seconds"] for s in self.sessions)
        box_s = sum(s["sandbox_seconds"] for s in self.sessions)
        wall = sum(s["wall_seconds"] for s in self.sessions)
        done = sum(s["tasks"] for s in self.sessions)
        toks = sum(s["new_tokens"] for s in self.sessions)
        return {
            "n": n, "passed": k, "pass_at_1": k / n if n else 0.0,
            "interval_95": intervals(k, n) if n else None,
            "by_status": by_status,
            "stop_reasons": {r: sum(t.stop_reason == r for t in self.tasks) for r in ("eos", "stopped", "length")},
            "throughput": {
                "tasks": done, "wall_seconds": round(wall, 1), "generate_seconds": round(gen_s, 1),
                "sandbox_seconds": round(box_s, 1),
                "tasks_per_minute": round(60 * done / wall, 3) if wall > 0 else None,
                "generated_tokens_per_s": round(toks / gen_s, 2) if gen_s > 0 else None,
                "note": "over the tasks generated by the sessions listed (a resumed run counts each session)",
            },
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.header, **self.summary(), "sessions": self.sessions,
                "tasks": [asdict(t) for t in sorted(self.tasks, key=_task_order)]}


def _task_order(t: TaskResult) -> tuple:
    kind, _, num = t.id.rpartition("/")
    return (kind, int(num)) if num.isdigit() else (kind, 0, num)


def intervals(k: int, n: int, confidence: float = 0.95) -> dict[str, list[float]]:
    """Wilson score and Clopper-Pearson (exact) intervals for k successes in n trials."""
    from scipy.stats import binomtest

    r = binomtest(k, n)
    out = {}
    for name, method in (("wilson", "wilson"), ("clopper_pearson", "exact")):
        ci = r.proportion_ci(confidence_level=confidence, method=method)
        out[name] = [round(float(ci.low), 4), round(float(ci.high), 4)]
    return out


def task_code(task: Any, answer: str) -> tuple[str, str]:
    """(code, extraction method) for `answer`: the first fenced block that defines the function the tests
    call (quality.extract); for HumanEval, preceded by the prompt's import lines (its signature uses them)."""
    from hotcold.quality.extract import definitions_only, entry_point, extract

    entry = getattr(task, "entry_point", None) or entry_point(task.tests)
    ex = extract(answer, entry)
    code = definitions_only(ex.code)
    if code and getattr(task, "source", "") == "humaneval":
        imports = "\n".join(m.group(0) for m in _IMPORT.finditer(task.text))
        if imports:
            code = imports + "\n" + code
    return code, ex.method


def prompt_ids(tok: Any, task: Any) -> list[int]:
    from hotcold.workloads import pass1_message

    return tok.encode(tok.render_chat([{"role": "user", "content": pass1_message(task)}]))


def run_pass1(model: Any, tok: Any, tasks: Sequence[Any], cfg: Pass1Config, out: Path | None = None, *,
              header: dict[str, Any] | None = None, resume: bool = True, show_progress: bool = True,
              on_batch: Callable[[Pass1Result], None] | None = None) -> Pass1Result:
    """Generate, score and (with `out`) write pass@1 for `tasks`. `header` (model, dataset, command)
    goes into the JSON and must match a checkpoint's to resume from it."""
    from hotcold.clikit import progress
    from hotcold.model.generate import generate_batch
    from hotcold.quality.sandbox import Sandbox, SandboxLimits, pass_at_1

    if not tasks:
        raise InputError("no tasks to run", "check --dataset, --split, --offset and --limit")
    head = {"format": FORMAT, **(header or {}), "config": asdict(cfg),
            "prompt": {"chat_template": "the model's own (from its GGUF)", "system": None,
                       "user": "workloads.pass1_message (MBPP: task text + its test asserts; HumanEval: EvalPlus's instruction prompt)",
                       "code": "first fenced code block (quality.extract)"},
            "task_ids": [t.id for t in tasks]}
    result = Pass1Result(head)
    partial = _partial_path(out) if out is not None else None
    if resume and partial is not None and partial.is_file():
        result = _load_partial(partial, head)
    done = {t.id for t in result.tasks}
    todo = [t for t in tasks if t.id not in done]
    ids = {t.id: prompt_ids(tok, t) for t in todo}
    limit = getattr(model, "max_len", None)
    longest = max(todo, key=lambda t: len(ids[t.id]), default=None)
    if limit is not None and longest is not None and len(ids[longest.id]) + cfg.max_new_tokens > limit:
        raise InputError(f"task {longest.id}'s prompt has {len(ids[longest.id])} tokens: with {cfg.max_new_tokens} new "
                         f"tokens it exceeds the model's context of {limit}", "pass a smaller --max-new-tokens")
    # Within each window, longest first: similar lengths in one batch waste the least padding.
    order = {t.id: i for i, t in enumerate(tasks)}
    todo.sort(key=lambda t: (order[t.id] // cfg.window, -len(ids[t.id])))
    stop_ids = tuple(getattr(tok, "stop_ids", None) or tok.eos_ids)
    pad_id = stop_ids[0] if stop_ids else 0
    box = Sandbox(SandboxLimits(timeout_s=cfg.timeout_s))
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": 0, "new_tokens": 0, "wall_seconds": 0.0,
               "generate_seconds": 0.0, "sandbox_seconds": 0.0, "resumed_with": len(result.tasks),
               "argv": sys.argv[1:]}
    result.sessions.append(session)
    t_start = time.perf_counter()
    since_write = 0
    with progress(disable=not show_progress) as p:
        bar = p.add_task("pass@1", total=len(tasks), completed=len(result.tasks), info=_info(result))
        for batch in _batches(todo, ids, cfg, {t.id: order[t.id] // cfg.window for t in todo}):
            texts = [""] * len(batch)

            def stop(r: int, new: list[int], _texts=texts) -> bool:
                _texts[r] += tok.decode(new[-1:], skip_special=False)
                return cfg.stop_at_fence and (_CLOSED_FENCE.search(_texts[r]) is not None
                                              or _TEST_AFTER_DEF.search(_texts[r]) is not None)

            t0 = time.perf_counter()
            gens = generate_batch(model, [ids[t.id] for t in batch], cfg.max_new_tokens, eos_ids=stop_ids,
                                  pad_id=pad_id, stop=stop)
            t1 = time.perf_counter()
            answers = [tok.decode(g.new_ids) for g in gens]
            codes = [task_code(t, a) for t, a in zip(batch, answers)]
            report = pass_at_1(batch, [c for c, _ in codes], workers=cfg.sandbox_workers, sandbox=box, extract=False)
            t2 = time.perf_counter()
            for t, g, a, (code, how), r in zip(batch, gens, answers, codes, report.results):
                result.tasks.append(TaskResult(id=t.id, status=r.status, passed=r.passed, detail=r.detail[:300],
                                               prompt_tokens=len(g.prompt_ids), new_tokens=len(g.new_ids),
                                               stop_reason=g.stop_reason, extraction=how, answer=a, code=code))
            session["tasks"] += len(batch)
            session["new_tokens"] += sum(len(g.new_ids) for g in gens)
            session["generate_seconds"] += t1 - t0
            session["sandbox_seconds"] += t2 - t1
            session["wall_seconds"] = time.perf_counter() - t_start
            since_write += len(batch)
            if partial is not None and since_write >= cfg.checkpoint_every:
                _write_json(partial, result.to_json())
                since_write = 0
            if on_batch is not None:
                on_batch(result)
            p.update(bar, advance=len(batch), info=_info(result))
    session["wall_seconds"] = time.perf_counter() - t_start
    if out is not None:
        _write_json(out, result.to_json())
        if partial is not None:
            partial.unlink(missing_ok=True)
    return result


def _batches(todo: list[Any], ids: dict[str, list[int]], cfg: Pass1Config, window_of: dict[str, int]) -> list[list[Any]]:
    """Consecutive tasks of one window (sorted longest prompt first) grouped up to batch_size rows and
    max_batch_tokens cache slots; a task too long for the token budget runs alone."""
    out: list[list[Any]] = []
    for t in todo:
        if out and window_of[out[-1][0].id] == window_of[t.id]:
            cur = out[-1]
            longest = max(len(ids[x.id]) for x in cur + [t])
            if len(cur) < cfg.batch_size and (len(cur) + 1) * (longest + cfg.max_new_tokens) <= cfg.max_batch_tokens:
                cur.append(t)
                continue
        out.append([t])
    return out


def _info(r: Pass1Result) -> str:
    return f"{r.passed}/{r.n} pass" if r.n else ""


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.json")


# What must be equal for a checkpoint to be resumed: same model weights, task list, prompt and the
# settings that change an answer (a sparse run's thresholds and hot set among them). Batching does not (greedy answers are the same batched or one by one,
# tests/test_qwen.py), so a run may resume with another batch size, window or checkpoint interval.
_RESUME_KEYS = ("format", "model", "task_ids", "prompt", "dtype", "sparse")
RESULT_SETTINGS = ("max_new_tokens", "stop_at_fence", "timeout_s")


def _load_partial(path: Path, head: dict[str, Any]) -> Pass1Result:
    try:
        d = json.loads(path.read_text())
        tasks = [TaskResult(**t) for t in d["tasks"]]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})",
                         f"delete {path} to start again") from None
    for key in _RESUME_KEYS:
        if d.get(key) != head.get(key):
            raise IncompatibleError(f"checkpoint {path} was made with another {key} than this run",
                                    f"delete {path} to start again, or use another --out")
    for key in RESULT_SETTINGS:
        if d.get("config", {}).get(key) != head["config"].get(key):
            raise IncompatibleError(f"checkpoint {path} was made with another {key} than this run",
                                    f"delete {path} to start again, or use another --out")
    return Pass1Result(head, tasks, list(d.get("sessions", [])))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
