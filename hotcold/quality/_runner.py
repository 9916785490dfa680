"""The sandbox runner: the program `sandbox.py` starts as `python -S -B -c <this file's text>`.

Stdlib only, no hotcold imports (it runs with the candidate's empty working directory as cwd). It reads
one JSON job from stdin, then:

1. (runner, still with the caller's privileges) unshares network, mount, PID and IPC namespaces — as
   root directly, otherwise inside a new user namespace — makes every mount read-only and nosuid, and
   mounts a size-capped tmpfs, owned by the sandbox uid, on the working directory;
2. forks the candidate process (PID 1 of the new PID namespace, so every process it starts dies with
   it), which mounts a fresh /proc, sets rlimits, drops to the sandbox uid (root) or drops all
   capabilities (user namespace), sets no_new_privs and a parent-death SIGKILL, then runs
   code -> test_setup_code -> each test in one namespace and writes one JSON result line to the report fd;
3. waits for it, kills what is left of the sandbox uid when there is no PID namespace, and writes one
   JSON exit line (signal, CPU seconds, peak RSS) to the report fd.

Report lines: {"kind": "isolation" | "result" | "exit" | "sandbox_error", ...}. Every step that could
not be applied is listed under "missing" with the reason, never silently skipped.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and the generic table (aarch64)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
EXIT_SANDBOX_ERROR = 70


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


libc = ctypes.CDLL(None, use_errno=True)


def _errno_msg() -> str:
    e = ctypes.get_errno()
    return f"{os.strerror(e)} (errno {e})"


def _unshare(flags: int) -> str | None:
    return None if libc.unshare(ctypes.c_int(flags)) == 0 else _errno_msg()


def _mount(src, target, fstype, flags, data=None) -> str | None:
    enc = (lambda s: None if s is None else s.encode())
    r = libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    return None if r == 0 else _errno_msg()


def _write(path: str, text: str) -> str | None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        return f"{path}: {e.strerror}"
    return None


def _make_readonly(use_setattr: bool = True) -> str | None:
    """Every mount read-only and nosuid: mount_setattr (Linux >= 5.12) in one call, else (or when
    `use_setattr` is False, which the tests use to check this path) one remount per mount."""
    first = "not tried"
    if use_setattr:
        attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
        r = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), b"/",
                         ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        if r == 0:
            return None
        first = _errno_msg()
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
    failed = []
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    for row in rows:
        target = row[4].encode().decode("unicode_escape")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt in row[5].split(","):
            flags |= keep.get(opt, 0)
        if _mount(None, target, None, flags):
            failed.append(target)
    if "/" in failed or len(failed) == len(rows):
        return f"mount_setattr: {first}; remount of {', '.join(failed[:3])} failed"
    return None


def _hide_homes(workdir: str, extra: list[str]) -> tuple[list[str], str | None]:
    """Cover /root, /home (and the caller's HOME) with an empty tmpfs, then bind back only what Python
    needs from them (its prefix and sys.path entries), so the sandbox can neither read nor write the
    caller's home and still imports the stdlib from a Python installed there (pyenv, a venv)."""
    homes = []
    for h in ["/root", "/home", *extra]:
        h = os.path.realpath(h)
        if os.path.isdir(h) and h != "/" and not any(h == o or h.startswith(o + "/") for o in homes):
            homes.append(h)
    needs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path) if p}
    hidden = []
    for home in homes:
        keep = sorted(p for p in needs if (p == home or p.startswith(home + "/")) and os.path.exists(p))
        keep = [p for i, p in enumerate(keep) if not any(p.startswith(q + "/") for q in keep[:i])]
        if home in keep:
            continue  # Python lives at the top of it: nothing to hide without hiding Python
        fds = []
        try:
            fds = [(p, os.open(p, os.O_PATH)) for p in keep]
            err = _mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            if err:
                return hidden, f"{home}: {err}"
            for p, fd in fds:
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(p, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    open(p, "w").close()
                err = _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
                if err:
                    return hidden, f"bind {p}: {err}"
            if workdir.startswith(home + "/"):
                os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            return hidden, f"{home}: {e}"
        finally:
            for _, fd in fds:
                os.close(fd)
        hidden.append(home)
    return hidden, None


def _unreachable_python() -> str | None:
    """The first directory on the way to this Python's files that other users cannot search, if any
    (as seen from the current mount namespace, after the homes were hidden and Python bound back)."""
    for p in {sys.prefix, sys.base_prefix, *[q for q in sys.path if q and os.path.exists(q)]}:
        d = os.path.realpath(p)
        while True:
            try:
                if not os.stat(d).st_mode & 0o001:
                    return d
            except OSError:
                return d
            if d == "/":
                break
            d = os.path.dirname(d)
    return None


def _count_uid_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _kill_uid(uid: int) -> None:
    """Kill every process of the (unique) sandbox uid: a helper that becomes the uid and kill(-1)s."""
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
        os.waitpid(pid, 0)


def _add_site_packages() -> None:
    """The runner starts with -S (site's .pth processing costs more than the rest of a run); put the
    interpreter's site-packages on sys.path without it, so the candidate can import installed packages."""
    import site

    for p in site.getsitepackages():
        if os.path.isdir(p) and p not in sys.path:
            sys.path.append(p)


def main() -> None:
    _add_site_packages()
    job = json.loads(sys.stdin.buffer.read())
    report_fd = job["report_fd"]
    workdir = job["workdir"]

    def emit(obj) -> None:
        os.write(report_fd, (json.dumps(obj) + "\n").encode())

    applied: list[str] = []
    missing: list[str] = []
    root = os.geteuid() == 0
    uid, gid = job.get("uid"), job.get("gid")
    drop_uid = root and uid is not None
    userns = False
    nsflags = 0
    if job["namespaces"]:
        wanted = {"netns": CLONE_NEWNET, "mountns": CLONE_NEWNS, "pidns": CLONE_NEWPID, "ipcns": CLONE_NEWIPC}
        all_flags = sum(wanted.values())
        if root:
            if _unshare(all_flags) is None:
                nsflags = all_flags
            else:
                for name, flag in wanted.items():
                    err = _unshare(flag)
                    if err is None:
                        nsflags |= flag
                    else:
                        missing.append(f"{name}: unshare: {err}")
        else:
            err = _unshare(CLONE_NEWUSER | all_flags)
            if err is None:
                my_uid, my_gid = os.getuid(), os.getgid()
                bad = (_write("/proc/self/setgroups", "deny") or _write("/proc/self/uid_map", f"{my_uid} {my_uid} 1")
                       or _write("/proc/self/gid_map", f"{my_gid} {my_gid} 1"))
                if bad:
                    emit({"kind": "sandbox_error", "error": f"user namespace map: {bad}"})
                    sys.exit(EXIT_SANDBOX_ERROR)
                nsflags, userns = all_flags, True
                applied.append("userns")
            else:
                missing.extend(f"{n}: unshare(CLONE_NEWUSER|...): {err}" for n in wanted)
        for name, flag in wanted.items():
            if nsflags & flag and name != "mountns":
                applied.append(name)
    else:
        missing.append("namespaces: disabled by the caller")

    if nsflags & CLONE_NEWNS:
        err = _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
        if err is None:
            hidden, herr = _hide_homes(workdir, job.get("hide", []))
            if herr:
                missing.append(f"hide-homes: {herr}")
            else:
                applied.append("hide-homes:" + ",".join(hidden))
            err = _make_readonly(use_setattr=not job.get("force_remount"))
        if err is None:
            applied.append("fs-readonly")
        else:
            missing.append(f"fs-readonly: {err}")
        owner = uid if drop_uid else os.getuid()
        group = gid if drop_uid else os.getgid()
        err = _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                     f"size={job['disk_mb']}m,nr_inodes=4096,mode=0700,uid={owner},gid={group}")
        if err is None:
            applied.append("tmpfs-work")
        else:
            missing.append(f"tmpfs-work: {err}")
    else:
        missing.append("fs-readonly: no mount namespace")
    if not nsflags & CLONE_NEWNET:
        missing.append("netns: network is reachable")

    if drop_uid:
        hidden_python = _unreachable_python()
        if hidden_python:
            emit({"kind": "sandbox_error",
                  "error": (f"the sandbox uid cannot read the Python installation ({hidden_python} is not "
                            "world-searchable), and without a mount namespace it cannot be made visible"),
                  "fix": ("install Python where other users can read it (/usr, /opt), allow namespaces, or use "
                          "Sandbox(drop_uid=False) to run the code as root (unsafe)")})
            sys.exit(EXIT_SANDBOX_ERROR)

    nproc_base = 0
    if not drop_uid:  # RLIMIT_NPROC counts every process of the uid; leave room for the caller's own
        nproc_base = _count_uid_processes(os.getuid())
    emit({"kind": "isolation", "applied": applied, "missing": missing})

    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            _child(job, report_fd, nsflags, drop_uid, userns, nproc_base)
        finally:
            os._exit(EXIT_SANDBOX_ERROR)
    try:
        os.setpgid(pid, pid)  # (both sides, whichever runs first)
    except OSError:
        pass

    def stop(signum, frame) -> None:
        """SIGTERM from the caller at its wall-clock timeout: kill the candidate, then reap it below
        (with a PID namespace, reaping PID 1 means every process of the sandbox is gone)."""
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, stop)
    while True:
        try:
            _, status, ru = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    if drop_uid and not nsflags & CLONE_NEWPID:
        _kill_uid(uid)
    elif not nsflags & CLONE_NEWPID:
        try:
            os.killpg(pid, signal.SIGKILL)  # what is left of the candidate's process group
        except OSError:
            pass
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    emit({"kind": "exit", "signal": sig, "exitcode": code, "cpu_s": ru.ru_utime + ru.ru_stime,
          "maxrss_mb": ru.ru_maxrss / 1024})
    sys.exit(0 if sig is None else 128 + sig)


def _child(job, report_fd, nsflags, drop_uid, userns, nproc_base) -> None:
    applied: list[str] = []
    missing: list[str] = []

    def fail(msg: str) -> None:
        os.write(report_fd, (json.dumps({"kind": "sandbox_error", "error": msg}) + "\n").encode())
        os._exit(EXIT_SANDBOX_ERROR)

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if nsflags & CLONE_NEWPID and nsflags & CLONE_NEWNS:
        err = _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if err:
            missing.append(f"proc: {err}")
        else:
            applied.append("proc")

    lim = job["limits"]
    cpu = int(lim["cpu_s"])
    mem = int(lim["memory_mb"]) << 20
    fsize = int(lim["disk_mb"]) << 20
    for name, which, soft, hard in (("core", resource.RLIMIT_CORE, 0, 0),
                                    # hard = soft: SIGKILL at the limit (PID 1 of a namespace ignores SIGXCPU)
                                    ("cpu", resource.RLIMIT_CPU, cpu, cpu),
                                    ("as", resource.RLIMIT_AS, mem, mem),
                                    ("fsize", resource.RLIMIT_FSIZE, fsize, fsize),
                                    ("nofile", resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"]),
                                    ("nproc", resource.RLIMIT_NPROC, nproc_base + lim["nproc"],
                                     nproc_base + lim["nproc"])):
        try:
            resource.setrlimit(which, (soft, hard))
            applied.append(f"rlimit-{name}")
        except (OSError, ValueError) as e:
            missing.append(f"rlimit-{name}: {e}")

    workdir = job["workdir"]
    if drop_uid:
        try:
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        except OSError as e:
            fail(f"cannot drop to uid {job['uid']}: {e}")
        applied.append(f"uid={job['uid']}")
    elif userns:
        hdr, data = CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (CapData * 2)()
        if libc.capset(ctypes.byref(hdr), data) != 0:
            fail(f"cannot drop capabilities: {_errno_msg()}")
        applied.append("no-capabilities")
    else:
        missing.append("uid: the code runs as the caller's user" + (" (root)" if os.geteuid() == 0 else ""))
    if "rlimit-nproc" in applied and os.geteuid() == 0:  # root ignores RLIMIT_NPROC
        applied.remove("rlimit-nproc")
        missing.append("rlimit-nproc: not enforced for root")
    elif "rlimit-nproc" in applied and not drop_uid:  # shared with the caller's own processes
        applied[applied.index("rlimit-nproc")] = "rlimit-nproc(shared-uid)"
    for opt, name in ((PR_SET_NO_NEW_PRIVS, "no-new-privs"), (PR_SET_PDEATHSIG, "pdeathsig")):
        arg = 1 if opt == PR_SET_NO_NEW_PRIVS else signal.SIGKILL
        if libc.prctl(ctypes.c_int(opt), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0:
            applied.append(name)
        else:
            missing.append(f"{name}: {_errno_msg()}")

    try:
        os.chdir(workdir)
        os.umask(0o077)
        for d in ("home", "tmp"):
            os.makedirs(d, exist_ok=True)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except OSError as e:
        fail(f"cannot prepare the working directory {workdir}: {e}")

    _run_candidate(job, report_fd, applied, missing)


def _run_candidate(job, report_fd, applied, missing) -> None:
    write, exit_, dumps, clock = os.write, os._exit, json.dumps, time.perf_counter
    format_exc = traceback.format_exception
    me = os.getpid()
    stderr = sys.stderr
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    stage, status, exc = "code", "error", ""
    t0 = clock()
    try:
        exec(compile(job["code"], "<candidate>", "exec"), ns)
        if job["setup_code"].strip():
            stage = "setup"
            exec(compile(job["setup_code"], "<test_setup_code>", "exec"), ns)
        for i, test in enumerate(job["tests"], 1):
            stage = f"test {i}"
            exec(compile(test, f"<test {i}>", "exec"), ns)
        status = "pass"
    except MemoryError:
        ns.clear()
        status, exc = "oom", "MemoryError"
    except AssertionError as e:
        status = "fail" if stage.startswith("test") else "error"
        exc = f"AssertionError: {e}" if str(e) else "AssertionError"
    except SystemExit as e:
        exc = f"SystemExit({e.code!r}): the code called exit()"
    except BaseException as e:  # noqa: BLE001 - anything the candidate raises is its failure
        exc = f"{type(e).__name__}: {e}"[:500]
        try:
            stderr.write("".join(format_exc(e)[-20:]))
        except BaseException:  # noqa: BLE001
            pass
    if os.getpid() != me:  # a forked copy of the candidate reached the end: it does not report
        exit_(0)
    try:
        sys.stdout.flush()
        stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    try:
        write(report_fd, (dumps({"kind": "result", "status": status, "stage": stage, "exception": exc,
                                 "seconds": clock() - t0, "applied": applied, "missing": missing}) + "\n").encode())
    finally:
        exit_(0)


if __name__ == "__main__":
    main()
