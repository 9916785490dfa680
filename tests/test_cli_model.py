"""The CLI shell: help, version, generate, and one clear line for each kind of bad model input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from tests.gguf_util import write_gguf

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(r, *needles: str):
    assert r.exit_code not in (0, 1), (r.exit_code, r.output)  # 1 would be an internal error
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "generate" in r.output and "fetch" in r.output
    for cmd in ("generate", "fetch", "inspect"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd
    r = run("--version")
    assert r.exit_code == 0 and r.output.startswith("hotcold ")


def test_generate_json_on_tiny_gguf(tmp_path):
    from hotcold.model.registry import load_source

    path = write_gguf(load_source("random:tiny"), tmp_path / "tiny.gguf")
    r = run("generate", "--model", str(path), "--prompt", "the cat", "--no-chat-template", "-n", "5", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["new_tokens"] == 5 and d["prompt_tokens"] == 4  # "the", " c", "a", "t" in the tiny vocabulary
    for k in ("text", "decode_tokens_per_s", "prefill_tokens_per_s"):
        assert k in d


def test_bad_model_inputs(tmp_path):
    from hotcold.model.registry import load_source

    assert_one_line_error(run("generate", "-m", str(tmp_path / "missing.gguf"), "-p", "x"), "does not exist")
    assert_one_line_error(run("generate", "-m", "no-such-model", "-p", "x"), "unknown model", "smollm2-135m")
    (tmp_path / "emptydir").mkdir()
    assert_one_line_error(run("generate", "-m", str(tmp_path / "emptydir"), "-p", "x"), "config.json")
    good = write_gguf(load_source("random:tiny"), tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("generate", "-m", str(tmp_path / "trunc.gguf"), "-p", "x"), "trunc.gguf")
    other = write_gguf(load_source("random:tiny"), tmp_path / "gemma.gguf", arch="gemma3")
    assert_one_line_error(run("generate", "-m", str(other), "-p", "x"), "gemma3")
    (tmp_path / "text.gguf").write_text("not a model")
    assert_one_line_error(run("generate", "-m", str(tmp_path / "text.gguf"), "-p", "x"), "not a GGUF")
    assert_one_line_error(run("fetch", "nosuch"), "unknown model id")
    assert_one_line_error(run("generate", "-m", str(good), "-p", ""), "prompt is empty")


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "generate", "-m", str(tmp_path / "missing.gguf"), "-p", "x")
    assert r.exit_code == 2 and "Traceback" in r.stderr


@pytest.mark.smollm
def test_generate_smollm_writes_python(smollm_path):
    r = run("generate", "--model", "smollm2-135m", "--prompt", "Write a python function to check if a number is even.",
            "--temperature", "0", "-n", "60")
    assert r.exit_code == 0, r.output
    assert "def " in r.stdout and "% 2" in r.stdout
