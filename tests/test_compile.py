"""`hotcold compile` on the tiny model: profile -> solve -> export in one command, intermediate artifacts
kept beside the bundle and reused when their inputs are unchanged."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.memory import placement_bytes
from hotcold.model.config import shape

NEURON = 3 * 64 * 4  # bytes of one tiny-model neuron in float32


def _budget(n_neurons: int) -> str:
    base = placement_bytes(shape("tiny"), [0] * 4, "float32", ctx_len=512).gpu_total
    return str(base + n_neurons * NEURON)


def _compile(out, budget: str, *extra: str):
    r = CliRunner().invoke(app, ["compile", "-m", "random:tiny", "--dataset", "embedded", "--limit", "3",
                                 "--samples", "256", "--gpu-budget", budget, "-o", str(out), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_compile_reuses_unchanged_stages(tmp_path):
    out = tmp_path / "bundle"
    first = _compile(out, _budget(300))
    assert first["reused"] == {"profile": False, "placement": False, "bundle": False}
    parts = tmp_path / "bundle.parts"
    assert (parts / "profile" / "manifest.json").is_file() and (parts / "placement" / "manifest.json").is_file()
    assert (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    placement = json.loads((parts / "placement" / "manifest.json").read_text())
    assert manifest["placement"]["n_hot"] == first["n_hot"] and sum(first["n_hot"]) <= 300
    assert placement["profile"]["content_hash"] == manifest["profile"]["content_hash"]

    again = _compile(out, _budget(300))
    assert again["reused"] == {"profile": True, "placement": True, "bundle": True}
    assert again["keys"] == first["keys"]

    # only the budget changed: re-solve and re-export, never re-profile
    bigger = _compile(out, _budget(700))
    assert bigger["reused"] == {"profile": True, "placement": False, "bundle": False}
    assert sum(bigger["n_hot"]) > sum(first["n_hot"])

    # only an export option changed: re-export only
    bf16 = _compile(out, _budget(700), "--dtype", "bf16")
    assert bf16["reused"] == {"profile": True, "placement": False, "bundle": False} or \
        bf16["reused"] == {"profile": True, "placement": True, "bundle": False}
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"

    # an altered intermediate artifact is not trusted: it is re-made
    counts = parts / "profile" / "counts.safetensors"
    data = bytearray(counts.read_bytes())
    data[-3] ^= 0xFF
    counts.write_bytes(bytes(data))
    redo = _compile(out, _budget(700), "--dtype", "bf16")
    assert redo["reused"]["profile"] is False

    # and the compiled bundle runs
    r = CliRunner().invoke(app, ["run", str(out), "--token-ids", "1,20,30", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["new_tokens"] == 4 and res["mode"] == "threshold"


def test_compile_infeasible_budget_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["compile", "-m", "random:tiny", "--dataset", "embedded", "--limit", "2",
                                 "--samples", "0", "--gpu-budget", "1KiB", "-o", str(tmp_path / "b")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "error:" in r.output
    assert not (tmp_path / "b").exists()
