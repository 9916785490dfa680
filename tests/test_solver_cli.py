"""`hotcold solve`, `report`, `calibrate` through typer's CliRunner: help, results, files, errors."""

from __future__ import annotations

import base64
import json
import re
import sys
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.model.config import SHAPES
from hotcold.solver.placement import Placement
from hotcold.solver.synth import synthetic_profile

runner = CliRunner()


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof") / "profile"
    synthetic_profile(SHAPES["smollm2-135m"], seed=2, tokens=8192).save(d)
    return d


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("cmd", ["solve", "report", "calibrate"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0
    assert "Examples" in r.output
    r = run("--help")
    assert cmd in r.output


def test_solve_writes_placement_and_prints_json(tmp_path, profile_dir):
    out = tmp_path / "place"
    r = run("solve", "--profile", profile_dir, "--preset", "h200", "--gpu-budget", "400MiB", "--ctx-len", "2048",
            "-o", out, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    for key in ("policy", "status", "solve_seconds", "gpu_bytes", "cpu_bytes", "modelled_ms_per_token"):
        assert key in obj
    assert obj["policy"] == "adaptive" and obj["status"] == "optimal"
    assert obj["gpu_bytes"] <= 400 * 2**20
    pl = Placement.load(out)
    assert pl.content_hash == obj["content_hash"]


def test_solve_compare_and_report_files(tmp_path, profile_dir):
    out = tmp_path / "places"
    r = run("solve", "--profile", profile_dir, "--preset", "h200", "--gpu-budget", "350MiB", "--cold-mode", "predictor",
            "--compare", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert [c["policy"] for c in obj["compare"]] == ["fixed", "impact", "adaptive"]
    lat = {c["policy"]: c["modelled_ms_per_token"] for c in obj["compare"]}
    assert lat["adaptive"] <= min(lat["fixed"], lat["impact"]) * (1 + 1e-4)
    dirs = [out / p for p in ("fixed", "impact", "adaptive")]

    html, md = tmp_path / "r" / "report.html", tmp_path / "r" / "report.md"
    r = run("report", *dirs, "--html", html, "--markdown", md)
    assert r.exit_code == 0, r.output
    assert "why" in r.stdout and "adaptive" in r.stdout and "ms/token" in r.stdout

    # HTML: self-contained, every plot a decodable PNG
    class Imgs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.srcs = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Imgs()
    text = html.read_text()
    parser.feed(text)
    assert len(parser.srcs) >= 5
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # nothing external

    # markdown: renders; its images exist beside it
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").render(md.read_text())
    assert "<table>" in rendered and "<h1>" in rendered
    imgs = re.findall(r'<img src="([^"]+)"', rendered)
    assert len(imgs) >= 5 and all((md.parent / i).is_file() for i in imgs)

    r = run("report", dirs[2], "--json")
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert len(rep["placements"][0]["layers"]) == 30 and rep["explanation"]


def test_solve_fixed_tau_and_text_output(tmp_path, profile_dir):
    r = run("solve", "--profile", profile_dir, "--preset", "h200", "--policy", "fixed", "--tau", "0.05")
    assert r.exit_code == 0, r.output
    assert "fixed" in r.stdout and "given" in r.stdout
    assert "nothing written" in r.stderr


@pytest.mark.parametrize("args,code,text", [
    (["--gpu-budget", "10MiB"], 4, "alone need"),
    (["--gpu-budget", "lots"], 2, "cannot read GPU budget"),
    (["--policy", "greedy"], 2, "unknown policy"),
    (["--policy", "fixed", "--tau", "0.0001", "--gpu-budget", "300MiB"], 4, "over the"),
    (["--policy", "adaptive", "--tau", "0.1"], 2, "applies to the fixed policy"),
    (["--cold-mode", "psychic"], 2, "cold-neuron mode"),
])
def test_solve_errors_are_one_line(profile_dir, args, code, text):
    r = run("solve", "--profile", profile_dir, "--preset", "h200", *args)
    assert r.exit_code == code, r.output
    assert text in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) <= 3  # the progress line, the error (maybe wrapped)


def test_solve_bad_inputs(tmp_path, profile_dir):
    r = run("solve", "--profile", tmp_path / "nope", "--preset", "h200")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = run("solve", "--profile", profile_dir)
    assert r.exit_code == 2 and "no hardware given" in r.stderr
    r = run("solve", "--profile", profile_dir, "--preset", "pc-giant")
    assert r.exit_code == 2 and "unknown hardware preset" in r.stderr
    r = run("report", tmp_path / "nope")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_calibrate_cli_preset(tmp_path):
    r = run("calibrate", "--preset", "pc-low", "--out", tmp_path / "pc.json", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "pc-low"


def test_calibrate_without_torch_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ModuleNotFoundError
    r = run("calibrate", "--out", tmp_path / "hw.json", "--seconds", "2")
    assert r.exit_code == 2 and "measures with torch" in r.stderr and "--preset" in r.stderr
    assert not (tmp_path / "hw.json").exists()


def test_calibrate_cli(tmp_path):
    pytest.importorskip("torch", reason="hotcold calibrate measures with torch, which is not installed")
    r = run("calibrate", "--out", tmp_path / "hw.json", "--seconds", "2")
    assert r.exit_code == 0, r.output
    assert "GB/s" in r.stdout
    r = run("solve", "--profile", "/nonexistent", "--hardware", tmp_path / "hw.json")
    assert r.exit_code == 2
