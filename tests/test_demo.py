"""`hotcold demo` keeps only the reader's files: the report, plots, results and placements land in --out;
the bundles and the profile are built in a work directory that is gone at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.study.cli import DEMO_KEEPS, demo_config, run_demo

runner = CliRunner()


@pytest.mark.smollm
@pytest.mark.slow
def test_demo_leaves_only_the_report(tmp_path, smollm_path, capsys):
    """The demo's own configuration (embedded tasks, as on a machine without MBPP), made smaller: one
    budget, two prompts to profile, one to evaluate."""
    cfg = demo_config(None, cuda=False)
    cfg.profile_limit, cfg.eval_limit, cfg.budgets, cfg.policies, cfg.speed_new_tokens = 2, 1, ["ffn:0.3"], ["fixed"], 4
    out = tmp_path / "demo"
    (out).mkdir()
    (out / "results.json").write_text(json.dumps({"kind": "study"}))  # an earlier demo's output: replaced
    res = run_demo(cfg, out)
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in DEMO_KEEPS if n != "hardware.json")
    assert not Path(res["demo"]["work_dir"]).exists() and res["demo"]["work_removed"]
    assert res["demo"]["work_bytes"] > 100 * 2**20  # an fp32 bundle of SmolLM2 was built there
    assert res["demo"]["out_bytes"] < 5 * 2**20
    assert [r["name"] for r in res["runs"]] == ["fixed@ffn0.3"]
    for r in res["runs"]:
        assert r["bundle"] is None and Path(r["placement"]).parent == out / "placements"
        assert (Path(r["placement"]) / "manifest.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["placement"] == res["runs"][0]["placement"] and saved["profile"]["path"] is None
    # the workload line names the split (it said "embedded None" when the demo profiled every task)
    assert "on embedded train (2 prompts" in printed.err and "None" not in printed.err
    assert saved["config"]["profile_split"] == "train" and saved["config"]["eval_split"] == "test"
    # under the table: what was measured here, what the cost model predicts, and where things went
    assert "Measured here, on this machine's CPU" in printed.out and "Predicted by the cost model for `pc-high`" in printed.out
    assert f"wrote {out}/" in printed.out and "removed" in printed.out and "--keep" in printed.out
    assert "## What the numbers mean" in (out / "report.md").read_text()


def test_demo_refuses_an_out_dir_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = runner.invoke(app, ["demo", "--out", str(out)])
    assert r.exit_code == 2 and "not a demo's output" in r.stderr and r.stderr.count("\n") <= 3
    assert (out / "notes.txt").read_text() == "keep me"
