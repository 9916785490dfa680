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


def test_traces_land_on_the_neurons_of_the_mapped_profiles(stats):
    """The device maps the per-block traces with the map prepare used for workloads.npz: the same source
    frequencies give the same target frequencies, and each sequence's blocks are the real model's counts."""
    from hotcold.profiler.artifact import Profile
    from hotcold.study.scale import load_traces
    from hotcold.workloads.frequencies import DepthMap

    path, d = stats
    meta = json.loads((path / "workloads.json").read_text())
    L, n_ff = meta["layers"], meta["n_ff"]
    m = DepthMap(*meta["source_shape"], L, n_ff, seed=meta["seed"])
    train = Profile.load(d / "train").frequencies("decode")
    z = np.load(path / "workloads.npz")
    assert np.allclose(m.apply(train), z["train"].astype(np.float64), atol=1e-3)
    tr = load_traces(path, meta, L, n_ff)["held-out"]
    sq = Profile.load(d / "eval", with_sequences=True).sequences
    n = meta["traces"]["held-out"]["sequences"]
    per = np.bincount(sq["block_seq"])
    assert len(tr) == n >= 1 and sum(len(q["blocks"]) for q in tr) == per[:n].sum()
    assert n == 1 or per[:n].sum() <= 16  # whole sequences within --trace-blocks (16)
    b0 = np.flatnonzero(sq["block_seq"] == 0)
    assert [bt for _, bt in tr[0]["blocks"]] == [int(v) for v in sq["block_tokens"][b0]]
    assert np.allclose(tr[0]["blocks"][0][0], m.apply(sq["blocks"][b0[0]] / sq["block_tokens"][b0[0]]), atol=1e-6)
    assert tr[0]["tokens"] == int(sq["tokens"][0, 1]) and tr[0]["prefill"].shape == (L, n_ff)


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
    # swiglu: every policy decoded over the real model's traces; dynamic and per-prompt moved neurons in the loop
    assert {r["mode"] for r in cell["runs"].values()} == {"trace"}
    blocks = cell["workload"]["traces"]["held-out"]["blocks"]
    dyn, pr, orc = (cell["runs"][f"{p}@held-out"] for p in ("dynamic", "prompt", "oracle"))
    assert dyn["dynamic_decisions"] == blocks and dyn["timed_steps"] == blocks
    assert pr["neurons_moved"] > 0 and pr["migration"]["stall_ms_per_token"] > 0  # re-homed, timed, charged
    assert orc["neurons_moved"] > 0 and orc["migration"]["stall_ms_per_token"] == 0  # the ceiling is not charged
    assert fx["neurons_moved"] == 0 and fx["ms_per_token_with_migration"] == fx["ms_per_token"]
    assert orc["gpu_share_of_activations"] >= fx["gpu_share_of_activations"] - 1e-9  # its own top set
    assert {r["mode"] for r in res["cells"]["relu@ffn:0.3"]["runs"].values()} == {"stationary"}
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


def test_scale_study_refuses_an_unknown_cell(tmp_path):
    p = subprocess.run([sys.executable, "-m", "hotcold", "study", "--scale", "tiny", "--scenarios", "relu",
                        "--budgets", "ffn:0.3", "--cells", "swiglu@ffn:0.3", "--device", "cpu", "--stats", str(tmp_path),
                        "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "'swiglu@ffn:0.3' is not one of" in p.stderr and "relu@ffn:0.3" in p.stderr
