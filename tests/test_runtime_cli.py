"""`hotcold export` and `hotcold run` through the CLI on the tiny model: results on stdout (--json), one-line
errors with non-zero exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from tests.hybrid_util import frequency_order, make_placement, tiny_profile


def _json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from hotcold.model.registry import load_source

    src = load_source("random:tiny")
    root = tmp_path_factory.mktemp("cli")
    prof = tiny_profile(src, samples=256, limit=4)
    prof.save(root / "profile")
    make_placement(src, [0, 64, 200, 256], frequency_order(prof)).save(root / "placement")
    return root


def test_export_then_run(dirs):
    runner = CliRunner()
    info = _json(runner.invoke(app, ["export", "-m", "random:tiny", "--placement", str(dirs / "placement"),
                                     "--profile", str(dirs / "profile"), "-o", str(dirs / "bundle"), "--json"]))
    assert info["n_hot"] == [0, 64, 200, 256] and info["activation"]["rule"] == "product"
    assert set(info["files"]) >= {"gpu.safetensors", "cpu.safetensors", "neurons.safetensors"}

    res = _json(runner.invoke(app, ["run", str(dirs / "bundle"), "--token-ids", "1,30,40,50", "-n", "8", "--json"]))
    assert res["new_tokens"] == 8 and res["decode_tokens_per_s"] > 0
    d = res["decode"]
    assert len(d["layers"]) == 4 and {"gpu_ms_per_token", "cpu_ms_per_token", "gpu_share"} <= set(d["layers"][0])
    assert 0.0 < d["gpu_share"] < 1.0 and res["memory"]["cpu"]["peak_rss_bytes"] > 0

    exact = _json(runner.invoke(app, ["run", str(dirs / "bundle"), "--token-ids", "1,30,40,50", "-n", "8",
                                      "--cold-mode", "exact", "--json"]))
    dense = _json(runner.invoke(app, ["run", str(dirs / "bundle"), "--token-ids", "1,30,40,50", "-n", "8",
                                      "--cold-mode", "threshold", "--threshold", "0", "--json"]))
    assert exact["new_ids"] == dense["new_ids"]

    plain = runner.invoke(app, ["run", str(dirs / "bundle"), "--token-ids", "1,30", "-n", "3"])
    assert plain.exit_code == 0 and "GPU share of activated neurons" in plain.output


def test_run_errors(dirs):
    runner = CliRunner()
    runner.invoke(app, ["export", "-m", "random:tiny", "--placement", str(dirs / "placement"),
                        "-o", str(dirs / "exact-only")])
    cases = [
        (["run", str(dirs / "nope"), "--token-ids", "1"], "does not exist"),
        (["run", str(dirs / "exact-only"), "--prompt", "hi"], "has no tokenizer"),
        (["run", str(dirs / "exact-only"), "--token-ids", "1,x"], "comma-separated"),
        (["run", str(dirs / "exact-only"), "--token-ids", "1,99999"], "outside the vocabulary"),
        (["run", str(dirs / "exact-only"), "--token-ids", "1", "--cold-mode", "threshold"], "no activation thresholds"),
        (["run", str(dirs / "exact-only"), "--token-ids", "1", "--cold-mode", "fast"], "unknown --cold-mode"),
        (["run", str(dirs / "exact-only"), "--token-ids", "1", "--cold-mode", "exact", "--gpu-budget", "1KiB"],
         "smaller than bundle"),
        (["export", "-m", "random:tiny:seed=5", "--placement", str(dirs / "placement"), "-o", str(dirs / "x")],
         "fingerprint"),
        (["export", "-m", "random:tiny", "--placement", str(dirs / "placement"), "--profile", str(dirs / "profile"),
          "--rule", "nope", "-o", str(dirs / "x")], "unknown activation rule"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code not in (0, 1), (args, r.output)  # a domain error, not a crash
        assert msg in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (dirs / "x").exists()
