"""Run generated code against test asserts in a contained child process (MBPP pass@1).

One run = one fresh process (`_runner.py`): code, then `test_setup_code` (MBPP runs it after the
code), then each assert, in one namespace whose `__name__` is not "__main__" (so `if __name__ ==
"__main__":` blocks do not run, as in HumanEval's harness). What contains it — measured on each run
and returned in `SandboxResult.isolation` / `.missing` — is described in docs/sandbox.md:

* always: a fresh process group killed as a whole at the wall-clock timeout; RLIMIT_CPU, RLIMIT_AS,
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0; stdin /dev/null; a clean environment whose HOME and
  TMPDIR are inside the working directory; the working directory removed afterwards;
* where Linux allows (root, or unprivileged user namespaces): no network (a new network namespace
  with only a down loopback), every mount read-only and nosuid, the working directory a private
  size-capped tmpfs, a PID namespace (everything the code starts dies with it), its own /proc;
* as root: a fresh unprivileged uid per run (not shared with any other process, so RLIMIT_NPROC
  bounds a fork bomb and the uid's leftovers can be killed), no_new_privs, parent-death SIGKILL.

The result comes from a line the candidate's process writes at the end; this contains accidents and
ordinary bad code (hangs, memory blow-ups, fork bombs, stray writes, sockets, `exit()`), it is not a
defence against code written to forge its own report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hotcold.errors import HotcoldError, InputError

STATUSES = ("pass", "fail", "timeout", "oom", "error")
TAIL_CHARS = 2000
# A private uid range: far above login users, system users and the usual /etc/subuid ranges
# (100000 + 65536·k), so a sandbox uid is never shared with a real process.
UID_BASE = 0xC0000000
UID_SPAN = 1 << 24
EXIT_SANDBOX_ERROR = 70
STOP_GRACE_S = 10.0  # after the timeout, how long the runner gets to kill and reap the candidate
REAP_S = 5.0  # how long to keep killing a sandbox uid's leftover processes (no PID namespace)


class SandboxError(HotcoldError):
    """The sandbox itself could not run (not the candidate's fault)."""

    exit_code = 5


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `cpu_s=None` means the wall-clock timeout rounded up."""

    # CPU time is the budget that does not depend on how loaded the machine is (MBPP's slowest reference,
    # task 123, needs 4 s of CPU); the wall clock is twice that, to catch code that sleeps or blocks.
    timeout_s: float = 20.0  # wall clock, for all of code + setup + tests
    cpu_s: float | None = 10.0  # RLIMIT_CPU, soft = hard: SIGKILL when the process has used this much CPU
    memory_mb: int = 1024  # RLIMIT_AS (address space): a 50 GB allocation raises MemoryError
    disk_mb: int = 64  # the working directory's tmpfs size and RLIMIT_FSIZE (stdout/stderr files too)
    nproc: int = 32  # RLIMIT_NPROC for the sandbox uid
    nofile: int = 256  # RLIMIT_NOFILE

    def resolved_cpu_s(self) -> int:
        return max(1, math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s))


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES
    detail: str = ""  # the exception, signal or reason, one line
    seconds: float = 0.0  # wall clock of the whole run (process start to exit)
    cpu_s: float | None = None
    maxrss_mb: float | None = None
    stderr_tail: str = ""
    stdout_tail: str = ""
    isolation: tuple[str, ...] = ()  # what was in place on this run
    missing: tuple[str, ...] = ()  # what could not be applied, with the reason
    task_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["isolation"], d["missing"] = list(self.isolation), list(self.missing)
        return d


@dataclass(frozen=True)
class PassReport:
    """pass@1 over a task list: one greedy completion per task."""

    n: int
    passed: int
    results: tuple[SandboxResult, ...]
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.passed / self.n if self.n else 0.0

    @property
    def by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for r in self.results:
            counts[r.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "passed": self.passed, "pass_at_1": self.rate, "by_status": self.by_status,
                "seconds": self.seconds, "results": [r.to_dict() for r in self.results]}


@dataclass(frozen=True)
class Sandbox:
    """How runs are contained. `namespaces=False` or `drop_uid=False` turn those layers off (for
    comparison); `require_isolation=True` refuses to run where network or filesystem isolation is missing."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    namespaces: bool = True
    drop_uid: bool = True
    require_isolation: bool = False
    python: str = sys.executable
    tmp_dir: str | None = None  # where working directories are made (default: tempfile's)

    def run(self, code: str, tests: Sequence[str], setup_code: str = "", task_id: str | None = None) -> SandboxResult:
        return _run(self, code, list(tests), setup_code, task_id)


def run_tests(code: str, tests: Sequence[str], setup_code: str = "", *, limits: SandboxLimits | None = None,
              task_id: str | None = None) -> SandboxResult:
    """Run `code`, then `setup_code`, then each test statement; pass iff none raises."""
    return Sandbox(limits or SandboxLimits()).run(code, tests, setup_code, task_id)


def run_task(task: Any, code: str, *, limits: SandboxLimits | None = None, sandbox: Sandbox | None = None,
             include_challenge: bool = False) -> SandboxResult:
    """Run `code` against a workloads.Task's tests (and its challenge tests if asked)."""
    tests = list(task.tests) + (list(task.challenge_tests) if include_challenge else [])
    if not tests:
        raise InputError(f"task {task.id} has no test asserts to run",
                         "pass@1 needs a dataset with tests (mbpp, embedded, or jsonl with a 'tests' field)")
    box = sandbox or Sandbox(limits or SandboxLimits())
    return box.run(code, tests, task.setup_code, task.id)


def pass_at_1(tasks: Sequence[Any], completions: Sequence[str], workers: int = 2, *,
              limits: SandboxLimits | None = None, sandbox: Sandbox | None = None, extract: bool = True,
              include_challenge: bool = False,
              on_result: Callable[[SandboxResult], None] | None = None) -> PassReport:
    """Score one completion per task. With `extract`, the code is first pulled out of the model's
    answer (quality.extract.extract_code). `on_result` is called, from the worker threads, as each run
    finishes (progress bars). Results are in task order."""
    if len(tasks) != len(completions):
        raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}", "pass a positive number of workers")
    from concurrent.futures import ThreadPoolExecutor

    from hotcold.quality.extract import entry_point, extract_code

    box = sandbox or Sandbox(limits or SandboxLimits())

    def one(i: int) -> SandboxResult:
        task, answer = tasks[i], completions[i]
        code = extract_code(answer, entry_point(task.tests)) if extract else answer
        r = run_task(task, code, sandbox=box, include_challenge=include_challenge)
        if on_result is not None:
            on_result(r)
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = tuple(pool.map(one, range(len(tasks))))
    return PassReport(len(results), sum(r.passed for r in results), results, time.perf_counter() - t0)


def probe_isolation(sandbox: Sandbox | None = None) -> SandboxResult:
    """Run a trivial passing program and return its result: `.isolation` and `.missing` say what this
    machine enforces."""
    return (sandbox or Sandbox()).run("x = 1", ["assert x == 1"], task_id="probe")


# ---- the run -------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _runner_source() -> str:
    return Path(__file__).with_name("_runner.py").read_text(encoding="utf-8")


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_rng = random.SystemRandom()


@contextlib.contextmanager
def _sandbox_uid(enabled: bool):
    """A uid no other process uses (root only); None when not dropping privileges."""
    if not enabled or os.geteuid() != 0:
        yield None
        return
    with _uid_lock:
        uid = UID_BASE + _rng.randrange(UID_SPAN)
        while uid in _uids_in_use:
            uid = UID_BASE + _rng.randrange(UID_SPAN)
        _uids_in_use.add(uid)
    try:
        yield uid
    finally:
        deadline = time.monotonic() + REAP_S
        while _kill_uid_processes(uid) and time.monotonic() < deadline:
            time.sleep(0.01)
        with _uid_lock:
            _uids_in_use.discard(uid)


def _kill_uid_processes(uid: int) -> int:
    """SIGKILL every process whose real uid is `uid`; returns how many were found (zombies included:
    they are gone once their parent reaps them)."""
    found = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found += 1
                            os.kill(int(d), signal.SIGKILL)
                        break
        except (OSError, ValueError):
            continue
    return found


def _traversable(path: str) -> bool:
    """Whether any user can reach `path` (every directory on the way has o+x)."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in (p, *p.parents))


def _workdir_parent(box: Sandbox) -> str:
    """Where the working directory goes. A sandbox uid must be able to reach it: the default temp dir
    if it can, else /tmp; an explicit `tmp_dir` it cannot reach is an error."""
    dropping = box.drop_uid and os.geteuid() == 0
    if box.tmp_dir is not None:
        if dropping and not _traversable(box.tmp_dir):
            raise InputError(f"the sandbox's unprivileged uid cannot reach {box.tmp_dir} (a directory on the "
                             "way is not world-searchable)", "use a tmp_dir under /tmp, or chmod o+x its parents")
        return box.tmp_dir
    default = tempfile.gettempdir()
    if dropping and not _traversable(default) and os.path.isdir("/tmp") and _traversable("/tmp"):
        return "/tmp"
    return default


def _env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.path.join(workdir, "home"),
        "TMPDIR": os.path.join(workdir, "tmp"),
        "TMP": os.path.join(workdir, "tmp"),
        "TEMP": os.path.join(workdir, "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(f, chars: int = TAIL_CHARS) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * chars))
    return f.read().decode("utf-8", "replace")[-chars:]


def _run(box: Sandbox, code: str, tests: list[str], setup_code: str, task_id: str | None, *,
         force_remount: bool = False) -> SandboxResult:
    lim = box.limits
    parent = _workdir_parent(box)
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="hotcold-sandbox-", dir=parent)
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        uid = stack.enter_context(_sandbox_uid(box.drop_uid))
        out = stack.enter_context(tempfile.TemporaryFile())
        errf = stack.enter_context(tempfile.TemporaryFile())
        rfd, wfd = os.pipe()  # the report channel: JSON lines from the runner and the candidate
        stack.callback(os.close, rfd)
        if uid is not None:
            os.chown(workdir, uid, uid)
        job = {"report_fd": wfd, "workdir": workdir, "uid": uid, "gid": uid, "namespaces": box.namespaces,
               "hide": [os.path.expanduser("~")], "force_remount": force_remount,
               "code": code, "tests": tests, "setup_code": setup_code or "", "disk_mb": lim.disk_mb,
               "limits": {"cpu_s": lim.resolved_cpu_s(), "memory_mb": lim.memory_mb, "disk_mb": lim.disk_mb,
                          "nproc": lim.nproc, "nofile": lim.nofile}}
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen([box.python, "-S", "-B", "-c", _runner_source()], stdin=subprocess.PIPE,
                                    stdout=out, stderr=errf, pass_fds=(wfd,), cwd=workdir, env=_env(workdir),
                                    start_new_session=True)
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox interpreter {box.python}: {e.strerror}",
                               "check that Python is installed where sys.executable points") from None
        finally:
            os.close(wfd)
        timed_out = False
        try:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(job).encode())
                proc.stdin.close()
            _wait(proc, lim.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # the timeout, or the caller interrupted us
                _stop(proc)
        seconds = time.perf_counter() - t0
        lines = _read_report(rfd)
        stderr_tail, stdout_tail = _tail(errf), _tail(out, TAIL_CHARS // 2)
    return _classify(box, lines, proc.returncode, timed_out, seconds, stderr_tail, stdout_tail, task_id)


def _stop(proc: subprocess.Popen) -> None:
    """Ask the runner to kill the candidate and reap it (SIGTERM); if it does not exit within
    STOP_GRACE_S, kill the runner's process group outright."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        _wait(proc, STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    """proc.wait(timeout) without its polling sleeps (up to 50 ms each): block on a pidfd when the OS
    has them (Linux >= 5.3)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        proc.wait(timeout=timeout)
        return
    try:
        import select

        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
        proc.wait()
    finally:
        os.close(pidfd)


def _read_report(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    lines = []
    for raw in b"".join(chunks).decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(raw)
            if isinstance(obj, dict) and "kind" in obj:
                lines.append(obj)
    return lines


def _classify(box: Sandbox, lines: list[dict], returncode: int, timed_out: bool, seconds: float,
              stderr_tail: str, stdout_tail: str, task_id: str | None) -> SandboxResult:
    by_kind: dict[str, dict] = {}
    for obj in lines:
        by_kind.setdefault(obj["kind"], obj)  # the first of each kind: the runner's, written before the candidate's
    if "sandbox_error" in by_kind and "result" not in by_kind:
        bad = by_kind["sandbox_error"]
        raise SandboxError(f"the sandbox could not start: {bad.get('error')}",
                           bad.get("fix") or "see docs/sandbox.md; run as root or enable unprivileged user namespaces")
    iso = by_kind.get("isolation", {})
    res = by_kind.get("result")
    ext = by_kind.get("exit", {})
    applied = tuple(iso.get("applied", [])) + tuple((res or {}).get("applied", []))
    missing = tuple(iso.get("missing", [])) + tuple((res or {}).get("missing", []))
    if box.require_isolation:
        gaps = [m for m in missing if m.startswith(("netns", "pidns", "fs-readonly", "tmpfs-work"))]
        if gaps:
            raise SandboxError(f"sandbox isolation unavailable here: {'; '.join(gaps)}",
                               "run as root or where unprivileged user namespaces are enabled, "
                               "or do not require isolation")
    sig = ext.get("signal")
    cpu = ext.get("cpu_s")
    common = {"seconds": seconds, "cpu_s": cpu, "maxrss_mb": ext.get("maxrss_mb"), "stderr_tail": stderr_tail,
              "stdout_tail": stdout_tail, "isolation": applied, "missing": missing, "task_id": task_id}
    if timed_out:
        return SandboxResult(False, "timeout", f"wall-clock timeout after {box.limits.timeout_s:g} s", **common)
    if res is not None and res.get("status") in STATUSES:
        status = res["status"]
        detail = res.get("exception", "") if status != "pass" else ""
        if status == "error" and res.get("stage"):
            detail = f"{res['stage']}: {detail}"
        return SandboxResult(status == "pass", status, detail, **common)
    # RLIMIT_CPU kills with SIGKILL (soft = hard); rusage rounds differently from the kernel's check
    cpu_limit = box.limits.resolved_cpu_s()
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= 0.9 * cpu_limit):
        return SandboxResult(False, "timeout", f"CPU-time limit of {cpu_limit} s", **common)
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return SandboxResult(False, "error", f"killed by {name}", **common)
    if not ext:
        return SandboxResult(False, "error", f"the sandbox runner exited with status {returncode} and no report",
                             **common)
    return SandboxResult(False, "error", f"the code exited (status {ext.get('exitcode')}) before the tests finished",
                         **common)
