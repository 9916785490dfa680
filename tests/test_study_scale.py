"""`hotcold study --scale`, CPU-sized: real profiles of the tiny random LLaMA (train, and a held-out workload
with per-sequence records) mapped onto the tiny shape, the hot-set replay, then every policy at a partial
and a whole-model budget, each cell in its own process, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hotcold.profiler.activation import ActivationSpec
from hotcold.profiler.engine import ProfileOptions, run_profile
from hotcold.study.scale import POLICIES, REPLAYED, replay_factors
from hotcold.workloads import load_dataset

TINY = "random:tiny:max_seq_len=1024"


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    from hotcold.model.registry import load_source
    from hotcold.study.scale import prepare

    src = load_source(TINY)
    d = tmp_path_factory.mktemp("scale")
    base = dict(mode="teacher-forced", batch_size=4)
    train = run_profile(src, load_dataset("embedded", "train", limit=12), ProfileOptions(**base), out=d / "train").profile
    spec = ActivationSpec("product", thresholds=tuple(train.manifest["activation"]["thresholds"]))
    run_profile(src, load_dataset("embedded", "test", limit=10),
                ProfileOptions(activation=spec, per_sequence=True, per_sequence_block=8, **base), out=d / "eval")
    return prepare(d / "stats", d / "train", {"held-out": d / "eval"}, "tiny", log=lambda s: None), d


def test_replay_factors_are_the_hotsets_ratios(stats):
    path, _ = stats
    hs = json.loads((path / "hotsets.json").read_text())["held-out"]
    s = hs["shares"][2]
    f = replay_factors(hs, s, 8, 256)  # 8 target layers over the profile's 4: each source layer twice
    for pol, ref in REPLAYED.items():
        r = np.asarray(f["policies"][pol]["cold_ratio"])
        src = (1 - np.asarray(hs["layers"][pol][2])) / (1 - np.asarray(hs["layers"][ref][2]))
        assert r.shape == (8,) and np.allclose(sorted(set(np.round(r, 12))), sorted(set(np.round(src, 12))))
    assert f["oracle_over_fixed"] >= 1.0 - 1e-9  # the per-sequence oracle is an upper bound
    assert f["policies"]["oracle"]["moved_per_token"] == 0.0
    assert f["policies"]["prompt"]["moved_per_token"] >= 0.0


def test_scale_study_cli_on_the_cpu(stats):
    path, d = stats
    out = d / "study"
    p = subprocess.run([sys.executable, "-m", "hotcold", "study", "--scale", "tiny", "--stats", str(path),
                        "--budgets", "ffn:0.3,ffn:1.0", "--device", "cpu", "--rounds", "2", "--new-tokens", "2",
                        "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "report:" in p.stdout and "fixed" in p.stdout
    res = json.loads((out / "study_scale.json").read_text())
    assert set(res["cells"]) == {"swiglu@ffn:0.3", "swiglu@ffn:1.0", "relu@ffn:0.3", "relu@ffn:1.0"}
    cell = res["cells"]["swiglu@ffn:0.3"]
    K = cell["neurons_that_fit"]
    assert {k.split("@")[0] for k in cell["runs"]} == set(POLICIES)
    for r in cell["runs"].values():
        assert r["n_hot_total"] <= K  # equal GPU memory: no policy holds more than the budget's neurons
        assert len(r["rounds_ms_per_token"]) == 2 and r["ms_per_token"] > 0
        assert 0.0 <= r["gpu_share_of_activations"] <= 1.0
    fx, rnd = cell["runs"]["fixed@held-out"], cell["runs"]["random@held-out"]
    assert fx["gpu_share_of_activations"] > rnd["gpu_share_of_activations"]  # the hot set beats a random one
    assert cell["runs"]["prompt@held-out"]["migration"]["neurons_per_token"] >= 0
    assert cell["migrate_s_per_neuron"] and cell["migrate_s_per_neuron"] > 0  # timed on the built model
    relu = res["cells"]["relu@ffn:0.3"]
    assert set(relu["skipped"]) == set(REPLAYED) and "stationary" in relu["skipped"]["dynamic"]
    whole = res["cells"]["swiglu@ffn:1.0"]
    assert whole["all_fit"] and list(whole["runs"]) == ["all-gpu"]
    assert (out / "report.md").exists() and "swiglu@ffn:0.3" in (out / "report.md").read_text()
    assert (out / "policies.png").exists()
    assert any(r.get("speedup_vs_fixed") for r in res["summary"])


def test_scale_study_refuses_missing_statistics(tmp_path):
    p = subprocess.run([sys.executable, "-m", "hotcold", "study", "--scale", "tiny", "--stats", str(tmp_path),
                        "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "workloads.npz does not exist" in p.stderr and "--prepare" in p.stderr
