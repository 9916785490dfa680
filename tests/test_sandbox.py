"""The pass@1 sandbox: real hostile programs are contained and scored as failures; references pass.

Every containment test checks the host afterwards (the file does not exist, no process is left, the
call returned within its timeout). Tests that depend on an OS feature (network namespace, read-only
mounts) skip with the reason when `probe_isolation()` reports it missing on the machine running them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from hotcold.quality import sandbox as sb
from hotcold.quality.sandbox import (
    Sandbox,
    SandboxError,
    SandboxLimits,
    pass_at_1,
    probe_isolation,
    run_task,
    run_tests,
)
from hotcold.workloads import Task, load_dataset

OK = ["assert True"]


@pytest.fixture
def box_dir():
    """A directory for working directories that a sandbox uid can reach (pytest's tmp_path is 0700)."""
    import tempfile

    d = tempfile.mkdtemp(prefix="hotcold-test-boxes-", dir="/tmp")
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def iso() -> set[str]:
    r = probe_isolation()
    assert r.passed, r
    return {name.split(":")[0].split("=")[0] for name in r.isolation}


def _children_of(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out.extend(frontier)
    return out


def _sandbox_uid_processes() -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration, ValueError):
                continue
            if sb.UID_BASE <= uid < sb.UID_BASE + sb.UID_SPAN:
                found.append(int(d))
    return found


def _assert_nothing_left() -> None:
    assert _children_of(os.getpid()) == [], "a sandbox process outlived its run"
    assert _sandbox_uid_processes() == [], "a process of a sandbox uid is still alive"


# ---- ordinary outcomes -----------------------------------------------------------------------------

def test_pass_fail_error_statuses():
    code = "def add(a, b):\n    return a + b\n"
    r = run_tests(code, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
    assert r.passed and r.status == "pass" and r.seconds < 10
    r = run_tests(code, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    assert (r.passed, r.status) == (False, "fail")
    r = run_tests(code, ["assert sub(1, 2) == -1"])
    assert r.status == "error" and "NameError" in r.detail and "test 1" in r.detail
    assert "NameError" in r.stderr_tail  # the traceback is kept
    r = run_tests("def add(a, b) return a + b", ["assert add(1, 2) == 3"])
    assert r.status == "error" and "SyntaxError" in r.detail
    r = run_tests("assert False, 'at import'", OK)
    assert r.status == "error"  # an assert in the code itself is not a test failure


def test_exit_and_stdin_are_failures_not_passes():
    assert run_tests("import sys\nsys.exit(0)", OK).status == "error"
    r = run_tests("import os\nos._exit(0)", OK)
    assert r.status == "error" and "exited" in r.detail
    r = run_tests("x = input()", OK)
    assert r.status == "error" and "EOFError" in r.detail
    r = run_tests("def f(n):\n    return f(n + 1)\nf(0)", OK)
    assert r.status == "error" and "RecursionError" in r.detail


def test_setup_code_runs_after_code_and_main_blocks_do_not_run():
    code = "class Box:\n    def __init__(self, v):\n        self.v = v\nif __name__ == '__main__':\n    raise SystemExit(3)"
    r = run_tests(code, ["assert b.v == 7"], setup_code="b = Box(7)")
    assert r.passed, r


def test_files_inside_the_working_directory_work_and_are_removed(box_dir):
    box = Sandbox(tmp_dir=box_dir)
    code = textwrap.dedent("""
        import os, tempfile
        open("out.txt", "w").write("hello")
        open(os.path.expanduser("~/notes.txt"), "w").write("home")
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("tmp")
        TMP = f.name
    """)
    r = box.run(code, ["assert open('out.txt').read() == 'hello'",
                       "assert open(os.path.expanduser('~/notes.txt')).read() == 'home'",
                       "assert open(TMP).read() == 'tmp' and TMP.startswith(os.getcwd())"])
    assert r.passed, r
    assert os.listdir(box_dir) == []  # the working directory is gone


def test_unreachable_tmp_dir_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only a root caller drops to a sandbox uid")
    tmp_path.chmod(0o700)
    from hotcold.errors import InputError

    with pytest.raises(InputError, match="cannot reach"):
        Sandbox(tmp_dir=str(tmp_path)).run("x = 1", OK)


# ---- containment (acceptance) -------------------------------------------------------------------

def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_tests("while True:\n    pass", OK, limits=SandboxLimits(timeout_s=2, cpu_s=None))
    took = time.monotonic() - t0
    assert (r.passed, r.status) == (False, "timeout")
    assert took < 2 + 3, took
    _assert_nothing_left()


def test_sleeping_forever_hits_the_wall_clock():
    r = run_tests("import time\ntime.sleep(10**6)", OK, limits=SandboxLimits(timeout_s=1.5))
    assert r.status == "timeout" and "wall-clock" in r.detail and r.seconds < 1.5 + 3
    _assert_nothing_left()


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    r = run_tests("while True:\n    pass", OK, limits=SandboxLimits(timeout_s=60, cpu_s=1))
    assert r.status == "timeout" and "CPU" in r.detail
    assert r.seconds < 30, r.seconds  # killed by RLIMIT_CPU, not by the 60 s wall clock
    _assert_nothing_left()


@pytest.mark.parametrize("code", [
    "x = bytearray(50 * 2**30)",
    "x = [0] * (50 * 2**30 // 8)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))",
])
def test_50gb_allocation_is_oom(code):
    limits = SandboxLimits(memory_mb=512, timeout_s=20)
    r = run_tests(code, OK, limits=limits)
    assert (r.passed, r.status) == (False, "oom"), r
    assert r.maxrss_mb is not None and r.maxrss_mb < limits.memory_mb + 64
    _assert_nothing_left()


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "import os\nwhile True:\n    os.fork()",
    # children that leave the process group and keep forking
    "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass",
])
def test_fork_bomb_is_contained(code):
    t0 = time.monotonic()
    r = run_tests(code, OK, limits=SandboxLimits(timeout_s=3))
    assert not r.passed and r.status in ("timeout", "error"), r
    assert time.monotonic() - t0 < 3 + 5
    _assert_nothing_left()
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_daemonized_child_does_not_outlive_the_run(box_dir):
    code = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
            os._exit(0)
    """)
    r = Sandbox(tmp_dir=box_dir).run(code, OK)
    assert r.passed, r  # the code itself is fine: its tests pass
    _assert_nothing_left()  # but its detached grandchild is gone with the run


def _write_probe_code(target: Path) -> str:
    return f"open({str(target)!r}, 'w').write('escaped')"


def test_writes_to_the_home_directory_are_blocked(iso):
    if "uid" not in iso and "fs-readonly" not in iso:
        pytest.skip("neither a sandbox uid nor read-only mounts are available here: home writes are not blocked")
    home = Path(os.path.expanduser("~"))
    target = home / f"hotcold-sandbox-probe-{uuid.uuid4().hex}"
    try:
        r = run_tests(_write_probe_code(target), OK)
        assert not r.passed and r.status == "error", r
        assert ("PermissionError" in r.detail or "Read-only" in r.detail or "FileNotFoundError" in r.detail)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("where", ["world-writable", "tmp", "dev-shm", "parent-of-cwd"])
def test_writes_outside_the_working_directory_are_blocked(iso, box_dir, where):
    if "fs-readonly" not in iso:
        pytest.skip("read-only mounts are not available here: world-writable directories stay writable")
    name = f"hotcold-sandbox-probe-{uuid.uuid4().hex}"
    if where == "world-writable":
        d = Path(box_dir) / "open"
        d.mkdir()
        d.chmod(0o777)
        code = _write_probe_code(d / name)
        target = d / name
    elif where == "tmp":
        target = Path("/tmp") / name
        code = _write_probe_code(target)
    elif where == "dev-shm":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        target = Path("/dev/shm") / name
        code = _write_probe_code(target)
    else:
        os.chmod(box_dir, 0o777)
        target = Path(box_dir) / name
        code = f"import os\nopen(os.path.join(os.path.dirname(os.getcwd()), {name!r}), 'w').write('x')"
    box = Sandbox(tmp_dir=box_dir) if where == "parent-of-cwd" else Sandbox()
    try:
        r = box.run(code, OK)
        assert not r.passed and r.status == "error", r
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_sockets_cannot_reach_the_host(iso):
    if "netns" not in iso:
        pytest.skip("network namespaces are not available here: network access is not blocked")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = textwrap.dedent(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"escaped")
        """)
        r = run_tests(code, OK, limits=SandboxLimits(timeout_s=10))
        assert not r.passed and r.status == "error", r
        assert "OSError" in r.detail or "ConnectionRefused" in r.detail or "Network is unreachable" in r.detail
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()
    r = run_tests("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)", OK)
    assert r.status == "error" and "unreachable" in r.detail
    r = run_tests("import socket\nsocket.getaddrinfo('example.com', 80)", OK)
    assert r.status == "error"


def test_disk_and_output_floods_are_capped(box_dir):
    limits = SandboxLimits(disk_mb=16, timeout_s=10)
    r = Sandbox(limits, tmp_dir=box_dir).run("open('big', 'wb').write(b'x' * (200 * 2**20))", OK)
    assert r.status in ("error", "oom") and not r.passed, r
    r = run_tests("while True:\n    print('y' * 10000)", OK, limits=limits)
    assert not r.passed and r.status in ("error", "timeout")
    assert len(r.stdout_tail) <= sb.TAIL_CHARS
    _assert_nothing_left()


def test_isolation_is_reported(iso):
    r = probe_isolation()
    assert "rlimit-as" in r.isolation and "rlimit-cpu" in r.isolation
    for layer in ("netns", "fs-readonly", "pidns"):  # each either applied or missing with a reason
        assert layer in iso or any(m.startswith(layer) for m in r.missing), (layer, r.missing)
    if os.geteuid() == 0:  # what this machine (root, Linux >= 5.12) must enforce
        assert {"netns", "pidns", "fs-readonly", "tmpfs-work", "hide-homes", "uid", "no-new-privs"} <= iso, r


def test_require_isolation_refuses_without_it():
    with pytest.raises(SandboxError, match="isolation unavailable"):
        Sandbox(namespaces=False, drop_uid=False, require_isolation=True).run("x = 1", OK)


def _python_world_searchable() -> bool:
    return sb._traversable(sys.base_prefix) and sb._traversable(sys.prefix)


def test_without_namespaces_timeouts_and_fork_bombs_are_still_contained():
    python = sys.executable
    if os.geteuid() == 0 and not _python_world_searchable():
        with pytest.raises(SandboxError, match="cannot read the Python installation"):
            Sandbox(namespaces=False).run("x = 1", OK)  # refused, rather than failing every import
        python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                       if os.path.exists(p) and sb._traversable(os.path.dirname(os.path.realpath(p)))), None)
        if python is None:
            pytest.skip(f"no Python that a sandbox uid can read without a mount namespace ({sys.base_prefix} is private)")
    box = Sandbox(SandboxLimits(timeout_s=2), namespaces=False, python=python)
    r = box.run("import heapq, fractions", OK)
    assert r.passed and "netns: network is reachable" in r.missing, r
    assert box.run("while True:\n    pass", OK).status == "timeout"
    code = "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass"
    assert not box.run(code, OK).passed
    if os.geteuid() == 0:  # the unique uid lets the leftovers be found and killed
        _assert_nothing_left()


def test_remount_fallback_is_read_only_too(iso, box_dir):
    """Kernels before 5.12 have no mount_setattr: the runner remounts each mount read-only instead."""
    if "fs-readonly" not in iso:
        pytest.skip("read-only mounts are not available here")
    d = Path(box_dir) / "open"
    d.mkdir()
    d.chmod(0o777)
    r = sb._run(Sandbox(), _write_probe_code(d / "x"), OK, "", None, force_remount=True)
    assert "fs-readonly" in r.isolation and r.status == "error"
    assert not (d / "x").exists()
    r = sb._run(Sandbox(), "open('ok', 'w').write('x')", ["assert open('ok').read() == 'x'"], "", None,
                force_remount=True)
    assert r.passed, r


def test_bad_interpreter_is_a_sandbox_error():
    with pytest.raises(SandboxError, match="cannot start"):
        Sandbox(python="/nonexistent/python3").run("x = 1", OK)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to become nobody")
def test_unprivileged_caller_uses_a_user_namespace(box_dir):
    """The same sandbox started by an ordinary user (nobody) isolates through a user namespace."""
    py = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
    if py is None:
        pytest.skip("no system python3 readable by nobody")
    vers = subprocess.run([py, "-c", "import sys; print(sys.version_info >= (3, 10))"], capture_output=True, text=True)
    if vers.stdout.strip() != "True":
        pytest.skip("the system python3 is older than 3.10")
    repo = Path(__file__).resolve().parents[1]
    d = Path(box_dir) / "open"
    d.mkdir()
    d.chmod(0o777)
    script = textwrap.dedent(f"""
        from hotcold.quality.sandbox import probe_isolation, run_tests
        r = probe_isolation()
        print("ISOLATION", " ".join(r.isolation))
        print("WRITE", run_tests("open({str(d / 'x')!r}, 'w').write('x')", ["assert True"]).status)
        print("NET", run_tests("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)", ["assert True"]).status)
        print("PASS", run_tests("def f(): return 1", ["assert f() == 1"]).status)
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "HOME": "/nonexistent"}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c", script],
                         capture_output=True, text=True, env=env, cwd="/", timeout=120)
    if "userns" not in out.stdout:
        pytest.skip(f"unprivileged user namespaces are not available here: {out.stdout}{out.stderr}")
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert {"netns", "fs-readonly", "no-capabilities", "no-new-privs"} <= set(lines["ISOLATION"].split()), out.stdout
    assert lines["WRITE"] == "error" and lines["NET"] == "error" and lines["PASS"] == "pass"
    assert not (d / "x").exists()


# ---- pass@1 on references -----------------------------------------------------------------------

@pytest.mark.slow
def test_mbpp_test_split_references_pass(mbpp_path):
    tasks = load_dataset(f"mbpp:{mbpp_path}", "test").tasks
    t0 = time.monotonic()
    rep = pass_at_1(tasks, [t.code for t in tasks], workers=2, extract=False)
    took = time.monotonic() - t0
    failed = [(r.task_id, r.status, r.detail) for r in rep.results if not r.passed]
    print(f"\nMBPP test split references: {rep.passed}/{rep.n} = {rep.rate:.4f} in {took:.1f} s "
          f"(2 workers); failures: {failed}")
    assert rep.n == 500 and rep.rate >= 0.99, failed
    _assert_nothing_left()


def test_embedded_references_all_pass():
    tasks = load_dataset("embedded").tasks
    rep = pass_at_1(tasks, [t.code for t in tasks], workers=2, extract=False)
    assert rep.passed == rep.n == len(tasks), [(r.task_id, r.detail) for r in rep.results if not r.passed]


def test_pass_at_1_extracts_code_from_answers():
    tasks = load_dataset("embedded", limit=4).tasks
    answers = [f"Here you go:\n```python\n{t.code}\n```\nThis works." for t in tasks[:3]]
    answers.append("I think the answer is 42.")
    seen = []
    rep = pass_at_1(tasks, answers, workers=2, on_result=seen.append)
    assert (rep.n, rep.passed) == (4, 3) and rep.rate == 0.75 and len(seen) == 4
    assert rep.by_status["pass"] == 3 and rep.by_status["error"] == 1
    assert rep.to_dict()["pass_at_1"] == 0.75
    with pytest.raises(ValueError, match="completions"):
        pass_at_1(tasks, answers[:2])


def test_run_task_needs_tests():
    from hotcold.errors import InputError

    with pytest.raises(InputError, match="no test asserts"):
        run_task(Task(id="t/1", text="hi"), "x = 1")
    task = Task(id="t/2", text="t", tests=("assert f() == 1",), challenge_tests=("assert f() == 2",))
    assert run_task(task, "def f(): return 1").passed
    assert not run_task(task, "def f(): return 1", include_challenge=True).passed


def test_sandbox_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", "import hotcold.quality.sandbox as s; print(s._runner_source.cache_info().currsize)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
