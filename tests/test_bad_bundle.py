"""Every entry point that loads an exported Bundle (`hotcold run`, `hotcold bench --bundle`, `hotcold serve`) refuses
an altered one in a real subprocess: a non-zero exit, no traceback, one `error: ... — fix` line on stderr that
names the file or the bundle, and (serve) before it listens. Alterations: a weight file truncated, bytes flipped
in a weight file of unchanged size, manifest.json deleted, manifest.json not valid JSON."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hotcold import bundle as fmt

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # a refusal takes ~3 s (most of it importing torch); a server that starts instead would hang here


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A Bundle of the tiny random LLaMA (threshold rule, no tokenizer), exported once for the module."""
    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.registry import load_source
    from tests.hybrid_util import make_placement

    src = load_source("random:tiny")
    out = tmp_path_factory.mktemp("bad-bundle") / "b"
    export_bundle(src, make_placement(src, [0, 64, 200, 256], seed=1), out, options=ExportOptions(sparsity=None))
    return out


def _truncate(b: Path) -> str:
    p = b / fmt.GPU_FILE
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return fmt.GPU_FILE


def _flip(b: Path) -> str:
    p = b / fmt.CPU_FILE
    data = bytearray(p.read_bytes())
    n = len(data)
    i = n // 2
    data[i:i + 16] = bytes(x ^ 0xFF for x in data[i:i + 16])
    p.write_bytes(bytes(data))
    assert p.stat().st_size == n
    return fmt.CPU_FILE


def _delete_manifest(b: Path) -> str:
    (b / "manifest.json").unlink()
    return "manifest.json"


def _garble_manifest(b: Path) -> str:
    p = b / "manifest.json"
    p.write_text(p.read_text()[:100])  # cut inside the object: not valid JSON
    return "manifest.json"


ALTERATIONS = {"weights-truncated": _truncate, "weights-bytes-flipped": _flip,
               "manifest-deleted": _delete_manifest, "manifest-not-json": _garble_manifest}

ENTRY_POINTS = {
    "run": lambda b: ["run", str(b), "--token-ids", "1,2,3", "-n", "2", "--cold-mode", "exact", "--device", "cpu"],
    "bench": lambda b: ["bench", "--bundle", str(b), "--cold-mode", "exact", "--device", "cpu", "--tokens", "2",
                        "--warm", "1"],
    "serve": lambda b: ["serve", str(b), "--port", "0", "--device", "cpu", "--log-level", "warning"],
}


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_altered_bundle_is_refused_in_one_line(bundle, tmp_path, entry, alteration):
    b = tmp_path / "copy"
    shutil.copytree(bundle, b)
    named = ALTERATIONS[alteration](b)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOTCOLD_DEBUG": "0", "COLUMNS": "400"}
    try:
        r = subprocess.run([sys.executable, "-m", "hotcold", *ENTRY_POINTS[entry](b)], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hotcold {entry} did not refuse the altered bundle within {TIMEOUT_S} s; "
                    f"stdout {e.stdout!r}, stderr {e.stderr!r}")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert "internal error" not in r.stderr, r.stderr
    if entry == "serve":
        assert "http://" not in r.stdout and "serving" not in r.stderr, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    # one logical message: one line starting "error:"; if rich wrapped it, the rest are its continuation
    assert len(errors) == 1 and lines[0] == errors[0], r.stderr
    msg = " ".join(ln.strip() for ln in lines)
    assert " — " in msg, msg  # what went wrong — how to fix it
    assert named in msg and str(b) in msg, msg
