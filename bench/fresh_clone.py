"""A new user's first ten minutes, for real: clone the repo into an empty temporary directory (no
`shared/` beside it, so no MBPP), make a fresh venv, and run the README's two commands exactly:

    pip install torch==2.13.0 -e . && hotcold demo
    pip install -e '.[test]' && python -m pytest -q

Reports the demo's wall time, what it left behind (the clone without .venv and .git, the temporary
directory, and the growth of the model cache $HOTCOLD_HOME, by default ~/.cache/hotcold), and the test
run's passed / failed / errors / skipped counts, as JSON (bench/results/fresh_clone.json) and a markdown
table on stdout. HOTCOLD_MBPP is removed from the environment of every step.

    nice -n 10 python bench/fresh_clone.py                    # HEAD of this repository, Python 3.11
    python bench/fresh_clone.py --solver-only --python ~/.pyenv/versions/3.12.1/bin/python \\
        --out bench/results/solver_py312.json                 # the solver's tests on another Python

`--solver-only` installs the project's dependencies except torch (no CPU build of torch exists for that
Python on this machine, and PyPI's torch is a multi-GB CUDA build) and runs the solver's tests there: the
solver needs no torch, and the tests that measure with torch (`hotcold calibrate`) skip with that reason.
Failures that name torch are still counted apart (`failed_for_want_of_torch`): a torch import crept back
into the solver's path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_INSTALL_DEMO = "pip install torch==2.13.0 -e . && hotcold demo"
README_TESTS = "pip install -e '.[test]' && python -m pytest -q"
SOLVER_TESTS = ["tests/test_solver.py", "tests/test_solver_cli.py", "tests/test_solver_highs.py", "tests/test_hardware.py"]


def du(path: Path, exclude: tuple[str, ...] = ()) -> int:
    """Bytes of the regular files under `path`, skipping top-level entries named in `exclude`."""
    if not path.exists():
        return 0
    total = 0
    for top in path.iterdir():
        if top.name in exclude:
            continue
        if top.is_file() and not top.is_symlink():
            total += top.stat().st_size
        elif top.is_dir() and not top.is_symlink():
            total += sum(f.stat().st_size for f in top.rglob("*") if f.is_file() and not f.is_symlink())
    return total


def counts(summary: str) -> dict[str, int]:
    """pytest's closing line ('3 failed, 320 passed, 13 skipped, 2 errors in 10.0s') -> counts."""
    got = {k: 0 for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")}
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", summary):
        got["errors" if word.startswith("error") else word] = int(n)
    return got


def skip_reasons(log: str) -> list[dict]:
    """pytest -rs lines ("SKIPPED [8] tests/test_solver_highs.py:87: highspy is not installed ...") -> records."""
    return [{"count": int(n), "where": where, "reason": why}
            for n, where, why in re.findall(r"^SKIPPED \[(\d+)\] (\S+?): (.*)$", log, re.M)]


def skip_totals(skips: list[dict]) -> dict[str, int]:
    """Skips per reason, MBPP's counted apart (tests/mbpp_util.py's one reason starts "needs MBPP")."""
    by: dict[str, int] = {}
    for k in skips:
        by[k["reason"]] = by.get(k["reason"], 0) + k["count"]
    return dict(sorted(by.items(), key=lambda kv: -kv[1]))


def summary_line(text: str) -> str:
    lines = [ln.strip("= ").strip() for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1] if lines else ""


class Steps:
    """Runs shell steps in the venv with HOTCOLD_MBPP unset, logging each one's output to a file."""

    def __init__(self, root: Path, venv: Path, env_extra: dict[str, str]):
        self.root, self.venv = root, venv
        env = {k: v for k, v in os.environ.items() if k not in ("HOTCOLD_MBPP", "VIRTUAL_ENV", "PYTHONPATH")}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
        env["VIRTUAL_ENV"] = str(venv)
        env.update(env_extra)
        self.env = env
        self.done: list[dict] = []

    def run(self, name: str, cmd: str, cwd: Path) -> dict:
        log = self.root / f"{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL).returncode
        step = {"name": name, "command": cmd, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                "log": str(log)}
        self.done.append(step)
        return step


def untracked(clone: Path) -> dict[str, int]:
    """Top-level entries of the clone that git does not track (besides .venv and .git), with their bytes."""
    got = {}
    for p in sorted(clone.iterdir()):
        if p.name in (".venv", ".git"):
            continue
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", p.name], cwd=clone,
                                 capture_output=True).returncode == 0
        if not tracked:
            got[p.name] = p.stat().st_size if p.is_file() else du(p)
    return got


def fresh_repo(root: Path, repo: Path) -> tuple[Path, str]:
    clone = root / "hotcold"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    for d in (clone, *clone.parents):
        if (d / "shared" / "data" / "mbpp.jsonl").is_file():
            sys.exit(f"{d}/shared/data/mbpp.jsonl exists above the clone: pick a --tmp without shared/ above it")
    return clone, commit


def full_run(args) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="hotcold-fresh-", dir=args.tmp))
    tmpdir = root / "tmp"  # the steps' TMPDIR: what the demo leaves in its temp space is measured here
    tmpdir.mkdir()
    cache = Path(os.environ.get("HOTCOLD_HOME") or Path.home() / ".cache" / "hotcold")
    result: dict = {"kind": "fresh_clone", "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": args.python,
                    "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                "loadavg_start": os.getloadavg()},
                    "hotcold_home": str(cache), "hotcold_home_is_under_home": str(cache).startswith(str(Path.home()))}
    steps_done = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("clone", total=5)

        def advance(what: str) -> None:
            nonlocal steps_done
            steps_done += 1
            bar.update(task, completed=steps_done, description=what)

        clone, commit = fresh_repo(root, Path(args.repo))
        result["commit"] = commit
        result["clone"] = str(clone)
        checkout_bytes = du(clone, exclude=(".git",))
        advance("venv")
        venv = clone / ".venv"
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        result["python_version"] = subprocess.run([str(venv / "bin" / "python"), "--version"], capture_output=True,
                                                  text=True).stdout.strip()
        steps = Steps(root, venv, {"TMPDIR": str(tmpdir)})
        cache_before = du(cache)
        advance("pip install torch==2.13.0 -e .")
        install = steps.run("install", README_INSTALL_DEMO.split(" && ")[0], clone)
        advance("hotcold demo")
        demo = steps.run("demo", README_INSTALL_DEMO.split(" && ")[1], clone) if install["rc"] == 0 else None
        demo_log = Path(demo["log"]).read_text() if demo else ""
        result["demo"] = {
            "command": README_INSTALL_DEMO, "install_seconds": install["seconds"], "install_rc": install["rc"],
            "rc": demo["rc"] if demo else None, "wall_seconds": demo["seconds"] if demo else None,
            "checkout_bytes": checkout_bytes,
            "clone_bytes_after": du(clone, exclude=(".venv", ".git")),
            "left_in_clone_bytes": du(clone, exclude=(".venv", ".git")) - checkout_bytes,
            "left_in_clone": untracked(clone),
            "left_in_tmp_bytes": du(tmpdir),
            "left_in_tmp": sorted(p.name for p in tmpdir.iterdir()),
            "hotcold_home_growth_bytes": du(cache) - cache_before,
            "out_dir_bytes": du(clone / "hotcold-demo"),
            "stdout_tail": demo_log.splitlines()[-14:],
        }
        advance("pip install -e '.[test]' && python -m pytest -q")
        t_install = steps.run("test-install", README_TESTS.split(" && ")[0], clone)
        # the README's command unchanged; PYTEST_ADDOPTS only adds pytest's skip report (reasons, MBPP's counted)
        steps.env.update(PYTEST_ADDOPTS="-rfEs", COLUMNS="400")
        tests = steps.run("tests", README_TESTS.split(" && ")[1], clone) if t_install["rc"] == 0 else None
        test_log = Path(tests["log"]).read_text() if tests else ""
        line = summary_line(test_log)
        result["tests"] = {"command": README_TESTS, "install_rc": t_install["rc"], "rc": tests["rc"] if tests else None,
                           "seconds": tests["seconds"] if tests else None, "summary": line, **counts(line),
                           "failures": re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", test_log, re.M),
                           "env_added": {"PYTEST_ADDOPTS": "-rfEs", "COLUMNS": "400"},
                           "skips_by_reason": skip_totals(skip_reasons(test_log)),
                           "skipped_for_mbpp": sum(k["count"] for k in skip_reasons(test_log)
                                                   if k["reason"].startswith("needs MBPP"))}
        advance("done")
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)  # clone to last test, all steps
    result["steps"] = steps.done
    if args.keep:
        result["kept"] = str(root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return result


def solver_only(args) -> dict:
    import tomllib

    root = Path(tempfile.mkdtemp(prefix="hotcold-solver-", dir=args.tmp))
    clone, commit = fresh_repo(root, Path(args.repo))
    venv = root / "venv"
    subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
    deps = tomllib.loads((clone / "pyproject.toml").read_text())["project"]["dependencies"]
    no_torch = [d for d in deps if not re.match(r"torch\b", d)]
    steps = Steps(root, venv, {})
    inst = steps.run("install", "pip install -q " + " ".join(shlex.quote(d) for d in [*no_torch, "pytest"])
                     + " && pip install -q --no-deps -e .", clone)
    py = venv / "bin" / "python"
    pulp = subprocess.run([str(py), "-c", "import pulp; print(pulp.__version__, pulp.listSolvers(onlyAvailable=True))"],
                          capture_output=True, text=True)
    torch_there = subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode == 0
    steps.env["COLUMNS"] = "400"  # pytest's short summary cuts the reasons to the terminal's width
    run = steps.run("tests", "python -m pytest -q -p no:cacheprovider -rfEs " + " ".join(SOLVER_TESTS), clone)
    log = Path(run["log"]).read_text()
    line = summary_line(log)
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - (.*))?$", log, re.M)
    # a module that fails to import is "ERROR tests/x.py" with no reason in the summary: take its traceback's
    # last "E   ...Error: ..." line from the "ERROR collecting tests/x.py" section
    for where, body in re.findall(r"^_+ ERROR collecting (\S+) _+$(.*?)(?=^_{3,} |^=+ )", log, re.M | re.S):
        last = re.findall(r"^E\s+(\w+Error: .*)$", body, re.M)
        frames = re.findall(r"^(hotcold/\S+:\d+): in <module>$", body, re.M)  # the import that failed
        why_here = (last[-1] + (f" (at {frames[-1]})" if frames else "")) if last else ""
        failed = [(t, why or (why_here if t == where else why)) for t, why in failed]
    torch_only = [t for t, why in failed if "torch" in (why or "")]
    skips = skip_reasons(log)  # every skip states its reason
    result = {"kind": "solver_tests_other_python", "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit,
              "python_version": subprocess.run([str(py), "--version"], capture_output=True, text=True).stdout.strip(),
              "installed": no_torch, "install_rc": inst["rc"], "torch_importable": torch_there, "pulp": pulp.stdout.strip() or pulp.stderr.strip()[-300:],
              "tests": SOLVER_TESTS, "summary": line, **counts(line),
              "failed_for_want_of_torch": len(torch_only),
              "failed_otherwise": [t for t, why in failed if "torch" not in (why or "")],
              "failures": [f"{t} - {why}" for t, why in failed],
              "skips": skips, "skips_without_reason": sum(k["count"] for k in skips if not k["reason"].strip())}
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def table(r: dict) -> str:
    d, t = r["demo"], r["tests"]
    mb = 2**20
    rows = [
        ("commit", r["commit"][:12]),
        ("Python", r["python_version"]),
        ("`" + d["command"] + "`", f"rc {d['install_rc']} / {d['rc']}; install {d['install_seconds']:.0f} s, "
                                   f"demo {d['wall_seconds']:.0f} s" if d["wall_seconds"] is not None else "not run"),
        ("left in the clone by the two commands (without .venv)", f"{d['left_in_clone_bytes'] / mb:.1f} MB: "
         + (", ".join(f"{k}/ {v / mb:.1f} MB" for k, v in d["left_in_clone"].items()) or "nothing")),
        ("left in the temporary directory", f"{d['left_in_tmp_bytes'] / mb:.1f} MB"),
        (f"growth of {r['hotcold_home']}", f"{d['hotcold_home_growth_bytes'] / mb:.1f} MB"),
        ("`" + t["command"] + "`", f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                                   f"{t['skipped']} skipped ({t.get('skipped_for_mbpp', '?')} need MBPP) in "
                                   f"{t['seconds']:.0f} s" if t["seconds"] else "not run"),
        ("wall time, clone to last test", f"{r['wall_seconds'] / 60:.1f} min" if "wall_seconds" in r else "?"),
        ("load average (start → end)", f"{r['machine']['loadavg_start'][0]:.1f} → {r['machine']['loadavg_end'][0]:.1f} "
                                       f"on {r['machine']['cpus']} CPUs"),
    ]
    return "\n".join(["| what | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(REPO), help="repository to clone (its HEAD)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the fresh venv")
    ap.add_argument("--tmp", default=None, help="where the temporary directory goes (default: the system's)")
    ap.add_argument("--solver-only", action="store_true", help="only the solver's tests, without torch")
    ap.add_argument("--note", default=None, help="a line recorded in the JSON (e.g. what --repo holds beyond HEAD)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (and its logs)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/fresh_clone.json, "
                                                "or solver_py<version>.json with --solver-only)")
    args = ap.parse_args()
    # A user's terminal delivers Ctrl-C to what they run. Started with `&` from a script, this process has
    # SIGINT ignored, and every step would inherit that (tests/test_profiler_procs.py sends SIGINT to a
    # profile run and failed so): a handled signal is reset to the default at exec, an ignored one is not.
    sigint_was_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if sigint_was_ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    res = solver_only(args) if args.solver_only else full_run(args)
    res["sigint_was_ignored_here"] = sigint_was_ignored  # steps ran with the default SIGINT either way
    if args.note:
        res["note"] = args.note
    default = (f"solver_py{res['python_version'].split()[-1].rsplit('.', 1)[0].replace('.', '')}.json"
               if args.solver_only else "fresh_clone.json")
    out = Path(args.out or REPO / "bench" / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(res, indent=2) if args.solver_only else table(res))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
