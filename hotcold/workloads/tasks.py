"""The records every workload loader yields, and the small stats object that says what was skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hotcold.errors import InputError


@dataclass(frozen=True)
class Task:
    """One prompt of a workload.

    `id` is unique within its dataset ("mbpp/11", "embedded/3", "jsonl/7"). `tests` are Python
    statements (MBPP's `assert ...` lines); `code` is the reference solution (\\n line ends) or None;
    `setup_code` runs after `code` and before the tests (MBPP's `test_setup_code`).
    """

    id: str
    text: str
    tests: tuple[str, ...] = ()
    code: str | None = None
    setup_code: str = ""
    challenge_tests: tuple[str, ...] = ()
    task_id: int | None = None
    source: str = ""
    entry_point: str | None = None  # the function the tests call, when the dataset names it (HumanEval)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "tests": list(self.tests), "code": self.code,
                "setup_code": self.setup_code, "challenge_tests": list(self.challenge_tests),
                "task_id": self.task_id, "source": self.source, "entry_point": self.entry_point}


PromptItem = Task  # the profiler's name for the same record


@dataclass
class LoadStats:
    """What a loader read: non-blank lines, records loaded, lines skipped (with the first reasons)."""

    path: str | None = None
    lines: int = 0
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # "file:line: reason", the first MAX_ERRORS

    MAX_ERRORS = 10

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if len(self.errors) < self.MAX_ERRORS:
            self.errors.append(f"{where}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "loaded": self.loaded, "skipped": self.skipped,
                "errors": list(self.errors)}


def select(tasks: list[Task] | tuple[Task, ...], limit: int | None = None, offset: int = 0) -> list[Task]:
    """`--offset K --limit N`: tasks[K : K+N] (all from K when `limit` is None)."""
    if offset < 0:
        raise InputError(f"--offset must be >= 0, got {offset}", "pass a non-negative offset")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}", "pass a positive limit or leave it out")
    end = None if limit is None else offset + limit
    return list(tasks[offset:end])
