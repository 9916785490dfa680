"""`hotcold study` end to end at a tiny size on the real SmolLM2 (profile → solve → export → run → report)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from typer.testing import CliRunner

from hotcold.cli import app

pytestmark = pytest.mark.smollm
runner = CliRunner()


def test_study_tiny_on_smollm(tmp_path, mbpp_path, smollm_path):
    out = tmp_path / "study"
    r = runner.invoke(app, ["study", "--dataset", f"mbpp:{mbpp_path}", "--profile-limit", "4", "--eval-limit", "2",
                            "--budgets", "ffn:0.2", "--policies", "fixed,adaptive", "--hardware", "pc-high",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert [run["policy"] for run in res["runs"]] == ["fixed", "adaptive"]
    fixed, adaptive = res["runs"]
    # the solver never models adaptive slower than fixed on the same profile, budget and cost model
    assert adaptive["modelled_ms_per_token"] <= fixed["modelled_ms_per_token"] * (1 + 1e-3)
    for run in res["runs"]:
        assert run["solver_status"] in ("optimal", "feasible")
        assert run["gpu_bytes"] <= run["gpu_budget_bytes"]
        assert 0.5 <= run["agreement"] <= 1.0  # 50% activation sparsity: close to dense, not identical
        assert run["kl"] >= 0 and run["perplexity"] > 1
        assert run["measured_decode_ms_per_token"] > 0
        assert (out / "bundles" / run["name"] / "manifest.json").is_file()
    assert res["dense"]["perplexity"] > 1
    html = (out / "report.html").read_text()
    imgs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(imgs) >= 2 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    md = (out / "report.md").read_text()
    assert "| fixed@ffn0.2 |" in md and "hotcold study" in md and (out / "pareto.png").is_file()
    assert (out / "results.csv").read_text().count("\n") == 3


def test_study_and_demo_help():
    for cmd in ("study", "demo"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output


def test_study_bad_policy(tmp_path):
    r = runner.invoke(app, ["study", "--policies", "fastest", "--out", str(tmp_path / "x"), "--dataset", "embedded"])
    assert r.exit_code == 2 and "unknown policy" in r.stderr
