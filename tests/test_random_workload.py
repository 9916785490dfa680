"""Random models with a workload: skewed per-neuron firing at any shape (the 70B study's model), another
model's tokenizer folded into the vocabulary, and the study run through the GPU engine with `dynamic`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.errors import InputError
from hotcold.model.registry import load_source
from hotcold.model.random import GATE_T, gate_scales

runner = CliRunner()


def test_gate_scales_hit_the_target_frequency():
    f = np.array([0.01, 0.05, 0.2, 0.4])
    s = gate_scales(f)
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = [(torch.nn.functional.silu(si * z).abs() > GATE_T).double().mean().item() for si in s]
    assert np.allclose(got, f, atol=0.005)


def test_workload_model_fires_its_neurons_as_asked():
    src = load_source("random:tiny:n_layers=2,workload=synthetic")
    plain = load_source("random:tiny:n_layers=2")
    assert src.fingerprint != plain.fingerprint and "workload=synthetic" in src.description
    assert torch.equal(src.get("layers.0.wq"), plain.get("layers.0.wq"))  # only gate/up rows are scaled
    # the gate rule |silu(w_i·x)| > GATE_T on RMS-normed inputs fires neuron i with about f_i
    x = torch.randn(4000, src.config.dim, generator=torch.Generator().manual_seed(1))
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True))
    for l in range(2):
        g = x @ src.get(f"layers.{l}.w_gate").t()
        fired = (torch.nn.functional.silu(g).abs() > GATE_T).double().mean(0).numpy()
        f = np.minimum(src.workload[l], 0.45)
        assert np.corrcoef(fired, f)[0, 1] > 0.95
        assert abs(fired.mean() - f.mean()) < 0.02


def test_folded_tokenizer_and_saved_tokenizer(tmp_path, smollm_source):
    tok = smollm_source.tokenizer()
    d = tok.save(tmp_path / "tok")
    text = "def is_even(n):\n    return n % 2 == 0  # ünïcödé"
    src = load_source(f"random:tiny:tokenizer={d}")
    ft = src.tokenizer()
    ids = tok.encode(text)
    assert ft.encode(text) == [i % 512 for i in ids] and max(ft.encode(text)) < 512
    assert ft.chat_ids("hi") == [i % 512 for i in tok.chat_ids("hi")]
    assert ft.vocab_size == 512 and "tokenizer=" in src.description
    from hotcold.model.tokenizer import Tokenizer

    back = Tokenizer.from_hf_dir(d)
    assert back.encode(text) == ids and back.eos_ids == tok.eos_ids and back.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("spec, words", [
    ("random:tiny:workload=nowhere", "neither 'synthetic' nor a profile"),
    ("random:tiny:gen=gpu", "generator device"),
    ("random:tiny:colour=red", "unknown field"),
])
def test_bad_random_specs(spec, words):
    with pytest.raises(InputError, match=words):
        load_source(spec)


def test_study_on_a_workload_model_through_the_engine(tmp_path, mbpp_path, smollm_source):
    d = smollm_source.tokenizer().save(tmp_path / "tok")
    out = tmp_path / "study"
    r = runner.invoke(app, ["study", "-m", f"random:tiny:n_layers=3,workload=synthetic,tokenizer={d}",
                            "--dataset", f"mbpp:{mbpp_path}", "--profile-limit", "4", "--eval-limit", "1",
                            "--budgets", "ffn:0.3", "--policies", "fixed,dynamic",
                            "--new-tokens", "4", "--device", "cpu", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    fixed, dyn = res["runs"]
    assert fixed["engine"] == dyn["engine"] == "runtime" and res["engine"] == "runtime"
    assert dyn["gpu_bytes"] == fixed["gpu_bytes"]  # dynamic moves neurons within fixed's memory
    assert dyn["migration"]["decisions"] >= 1
    assert fixed["hot_neurons"] == dyn["hot_neurons"] == "dense"  # as the runtime computes them
    assert 0.5 < dyn["agreement"] <= 1 and 0.5 < fixed["agreement"] <= 1
    assert 0 < fixed["gpu_share_of_active"] < 1
    # 50% sparsity on the cold ~70% of the neurons; no GPU here
    assert 0.2 < fixed["skipped_fraction"] < 0.5 and fixed["peak_gpu_bytes"] is None
    md = (out / "report.md").read_text()
    assert "## Against fixed thresholds" in md and "dynamic vs fixed" in md and "Random weights" in md


def test_fetch_saves_the_tokenizer(tmp_path, smollm_path):
    r = runner.invoke(app, ["fetch", "smollm2-135m", "--save-tokenizer", str(tmp_path / "tok")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and str(tmp_path / "tok") in r.output
    src = load_source(f"random:tiny:tokenizer={tmp_path / 'tok'}")
    assert src.tokenizer().encode("print('hi')")
