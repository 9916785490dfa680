"""Profiler: exact counts on a hand-built model, mode equivalences, merge, resume, synth, import, show and
bad input — on tiny models (seconds). SmolLM2 truth tests: test_profiler_smollm.py; torchrun and kill:
test_profiler_procs.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.errors import IncompatibleError, InputError
from hotcold.model.config import ModelConfig
from hotcold.model.registry import load_source
from hotcold.model.weights import TensorDictSource
from hotcold.profiler.activation import ActivationSpec, hist_index
from hotcold.profiler.artifact import Profile, hist_edges, merge
from hotcold.profiler.engine import ProfileOptions, default_checkpoint_dir, run_profile
from hotcold.profiler.sequences import PromptTokens
from hotcold.workloads import load_dataset

TINY = "random:tiny:max_seq_len=1024"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def same_counts(a: Profile, b: Profile) -> None:
    np.testing.assert_array_equal(a.active_count_prefill, b.active_count_prefill)
    np.testing.assert_array_equal(a.active_count_decode, b.active_count_decode)
    np.testing.assert_array_equal(a.hist_prefill, b.hist_prefill)
    np.testing.assert_array_equal(a.hist_decode, b.hist_decode)
    assert a.token_count == b.token_count
    assert a.manifest["activation"] == b.manifest["activation"]


# ---- a hand-built model whose activations are known exactly -------------------------------------------
#
# dim = n_ff = vocab = 4, attention output 0 (wo = 0) and FFN output 0 (w_down = 0), so every layer sees
# x = rmsnorm(embedding) = 2 e_t for token t. Layer 0: W_gate = I - 1/2 -> g = +1 on neuron t, -1 elsewhere;
# W_up = 1/2 -> u = 1: a = silu(+-1) = 0.731 on neuron t, -0.269 elsewhere. Layer 1 negates W_gate (active
# everywhere except t). The head predicts token t + 1 (mod 4), so greedy decoding from [0] is 1, 2, 3, 0, 1.

def hand_source(activation: str = "silu") -> TensorDictSource:
    n = 4
    cfg = ModelConfig(n_layers=2, dim=n, n_ff=n, n_heads=1, n_kv_heads=1, vocab_size=n, max_seq_len=64,
                      activation=activation, bos_token_id=None, eos_token_ids=(), name="hand")
    eye, zero, one = torch.eye(n), torch.zeros(n, n), torch.ones(n)
    t = {"tok_embeddings": 3.0 * eye, "norm": one, "output": torch.roll(eye, 1, dims=0)}
    for i, sign in enumerate((1.0, -1.0)):
        t.update({f"layers.{i}.attn_norm": one, f"layers.{i}.wq": zero, f"layers.{i}.wk": zero,
                  f"layers.{i}.wv": zero, f"layers.{i}.wo": zero, f"layers.{i}.ffn_norm": one,
                  f"layers.{i}.w_gate": sign * (eye - 0.5), f"layers.{i}.w_up": torch.full((n, n), 0.5),
                  f"layers.{i}.w_down": zero})
    return TensorDictSource(cfg, t, f"hand-built ({activation})")


def onehot_counts(tokens: list[int], n: int = 4) -> np.ndarray:
    return np.bincount(np.asarray(tokens, dtype=np.int64), minlength=n)


SEQS = [PromptTokens("a", (0, 1, 1), (2, 3)), PromptTokens("b", (3,), (0, 0, 2))]
PRE, DEC = [0, 1, 1, 3], [2, 3, 0, 0, 2]


@pytest.mark.parametrize("kind,threshold,layer0,layer1", [
    ("sign", None, "own", "others"),
    ("product", 0.5, "own", "others"),  # 0.731 > 0.5 > 0.269
    ("product", 0.25, "all", "all"),  # 0.269 > 0.25
])
@pytest.mark.parametrize("stream", [False, True])
def test_hand_model_teacher_forced_exact(kind, threshold, layer0, layer1, stream):
    src = hand_source()
    spec = ActivationSpec(kind, threshold=threshold)
    res = run_profile(src, SEQS, ProfileOptions(mode="teacher-forced", activation=spec, batch_size=2, stream=stream))
    p = res.profile
    assert p.token_count == {"prefill": 4, "decode": 5}
    for phase_tokens, counts in ((PRE, p.active_count_prefill), (DEC, p.active_count_decode)):
        own = onehot_counts(phase_tokens)
        expect = {"own": own, "others": len(phase_tokens) - own, "all": np.full(4, len(phase_tokens))}
        np.testing.assert_array_equal(counts[0], expect[layer0])
        np.testing.assert_array_equal(counts[1], expect[layer1])
    # histograms: per token, layer 0 has one |a| = silu(1) and three |a| = |silu(-1)|, layer 1 the reverse
    hi, lo = int(hist_index(torch.tensor([0.7311]))[0]), int(hist_index(torch.tensor([0.2689]))[0])
    assert p.hist_prefill[0, hi] == 4 and p.hist_prefill[0, lo] == 12
    assert p.hist_prefill[1, hi] == 12 and p.hist_prefill[1, lo] == 4
    assert p.hist_decode[0, hi] == 5 and p.hist_decode.sum(1).tolist() == [20, 20]


def test_hand_model_relu_definition():
    src = hand_source("relu")  # a = relu(g) * u: nonzero only where the gate is positive
    p = run_profile(src, SEQS, ProfileOptions(mode="teacher-forced", activation=ActivationSpec("relu"))).profile
    np.testing.assert_array_equal(p.active_count_prefill[0], onehot_counts(PRE))
    np.testing.assert_array_equal(p.active_count_decode[1], 5 - onehot_counts(DEC))


def test_hand_model_generate_exact():
    src = hand_source()
    opts = ProfileOptions(mode="generate", activation=ActivationSpec("sign"), max_new_tokens=5, keep_tokens=True)
    res = run_profile(src, [PromptTokens("p", (0,))], opts)
    assert res.generated == {"p": [1, 2, 3, 0, 1]}
    p = res.profile
    # prefill: token 0; decode: the four fed tokens 1, 2, 3, 0 (the last sampled token is never fed)
    assert p.token_count == {"prefill": 1, "decode": 4}
    np.testing.assert_array_equal(p.active_count_prefill, [[1, 0, 0, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(p.active_count_decode, [[1, 1, 1, 1], [3, 3, 3, 3]])


def test_relu_definition_refused_on_swiglu_model():
    with pytest.raises(InputError, match="relu"):
        run_profile(hand_source(), SEQS, ProfileOptions(mode="teacher-forced", activation=ActivationSpec("relu")))


# ---- mode equivalences on the tiny random model -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_source(TINY)


@pytest.fixture(scope="module")
def tasks():
    return load_dataset("embedded", limit=8)


def test_stream_equals_in_memory_with_calibration_and_samples(tiny, tasks):
    base = dict(mode="teacher-forced", batch_size=3, calibration_prompts=3, samples=16)
    mem = run_profile(tiny, tasks, ProfileOptions(**base)).profile
    st = run_profile(tiny, tasks, ProfileOptions(**base, stream=True)).profile
    same_counts(mem, st)
    for k in ("x", "mask", "phase"):
        np.testing.assert_array_equal(mem.samples[k], st.samples[k])
    # calibrated on 3 prompts: the thresholds are the inverse CDF of those prompts' |a| histograms
    assert mem.manifest["calibration"]["prompts"] == 3
    assert len(mem.manifest["activation"]["thresholds"]) == tiny.config.n_layers


def test_calibrated_thresholds_reproduce_from_histograms(tiny, tasks):
    # calibrating on every prompt: the saved histograms are the calibration histograms, so deriving
    # t_l from the Profile gives back exactly the thresholds the run used
    p = run_profile(tiny, tasks, ProfileOptions(max_new_tokens=6, calibration_prompts=len(tasks),
                                                activation=ActivationSpec(sparsity=0.7))).profile
    assert p.magnitude_thresholds(0.7) == p.manifest["activation"]["thresholds"]
    tokens = p.token_count["prefill"] + p.token_count["decode"]
    active = p.active_count.sum(1) / (tokens * p.n_ff)
    assert np.allclose(active, 0.3, atol=0.01)


def test_generate_counts_equal_recomputation(tiny, tasks):
    from hotcold.model.dense import DenseModel
    from hotcold.profiler.sequences import encode_tasks, tokenizer_for

    t = 0.12
    res = run_profile(tiny, tasks, ProfileOptions(max_new_tokens=7, activation=ActivationSpec(threshold=t),
                                                  keep_tokens=True))
    model = DenseModel.from_source(tiny)
    expect = np.zeros((2, tiny.config.n_layers, tiny.config.n_ff), np.int64)
    for s in encode_tasks(tasks.tasks, tokenizer_for(tiny), "generate"):
        seen = []
        hook = lambda layer, x, a: seen.append((layer, a.abs().numpy().reshape(-1, a.shape[-1])))  # noqa: E731
        cache = model.new_cache(1, len(s.prompt) + 7)
        model.forward(torch.tensor([s.prompt]), 0, cache, hook=hook, last_only=True)
        for layer, a in seen:
            expect[0, layer] += (a > t).sum(0)
        seen.clear()
        for i, tok in enumerate(res.generated[s.id][:-1]):
            model.forward(torch.tensor([[tok]]), len(s.prompt) + i, cache, hook=hook, last_only=True)
        for layer, a in seen:
            expect[1, layer] += (a > t).sum(0)
    np.testing.assert_array_equal(res.profile.active_count_prefill, expect[0])
    np.testing.assert_array_equal(res.profile.active_count_decode, expect[1])


def test_samples_do_not_depend_on_prompt_order(tiny, tasks):
    from hotcold.profiler.sequences import encode_tasks, tokenizer_for

    seqs = encode_tasks(tasks.tasks, tokenizer_for(tiny), "generate")
    opts = ProfileOptions(max_new_tokens=5, activation=ActivationSpec("sign"), samples=20)
    a = run_profile(tiny, seqs, opts).profile
    b = run_profile(tiny, seqs[::-1], opts).profile
    assert a.samples["x"].shape == (20, 4, 64) and a.samples["mask"].shape == (20, 4, 256)
    assert a.samples["x"].dtype == np.float16 and a.samples["mask"].dtype == bool
    assert set(np.unique(a.samples["phase"])) <= {0, 1}
    for k in ("x", "mask", "phase"):
        np.testing.assert_array_equal(a.samples[k], b.samples[k])
    same_counts(a, b)


def test_merge_of_halves_equals_whole(tiny, tmp_path):
    opts = ProfileOptions(max_new_tokens=5, activation=ActivationSpec(threshold=0.1))
    whole = run_profile(tiny, load_dataset("embedded", "test"), opts).profile
    a = run_profile(tiny, load_dataset("embedded", "test", limit=12), opts, out=tmp_path / "a").profile
    b = run_profile(tiny, load_dataset("embedded", "test", offset=12), opts, out=tmp_path / "b").profile
    merged = merge([Profile.load(tmp_path / "a"), Profile.load(tmp_path / "b")])
    same_counts(merged, whole)
    assert merged.manifest["dataset"]["n_prompts"] == 24
    # the same through the CLI, and the result loads back
    r = runner.invoke(app, ["profile", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    same_counts(Profile.load(tmp_path / "m"), whole)
    assert a.token_count["prefill"] + b.token_count["prefill"] == whole.token_count["prefill"]


def test_merge_refuses_other_thresholds(tiny, tasks, tmp_path):
    a = run_profile(tiny, tasks, ProfileOptions(max_new_tokens=2, activation=ActivationSpec(threshold=0.1))).profile
    b = run_profile(tiny, tasks, ProfileOptions(max_new_tokens=2, activation=ActivationSpec(threshold=0.2))).profile
    with pytest.raises(IncompatibleError, match="activation definition or thresholds"):
        merge([a, b])


def test_thresholds_from_another_profile_makes_runs_mergeable(tiny, tmp_path):
    r = runner.invoke(app, ["profile", "run", "-m", TINY, "-d", "embedded", "--limit", "4", "-n", "3",
                            "-o", str(tmp_path / "cal"), "--no-progress"])
    assert r.exit_code == 0, r.output
    for part, offset in (("p1", "4"), ("p2", "8")):
        r = runner.invoke(app, ["profile", "run", "-m", TINY, "-d", "embedded", "--limit", "4", "--offset", offset,
                                "-n", "3", "--thresholds-from", str(tmp_path / "cal"), "-o", str(tmp_path / part),
                                "--no-progress"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["profile", "merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "-o", str(tmp_path / "m"),
                            "--json"])
    assert r.exit_code == 0, r.output
    cal = Profile.load(tmp_path / "cal")
    assert Profile.load(tmp_path / "m").manifest["activation"]["thresholds"] == cal.manifest["activation"]["thresholds"]


def test_interrupted_run_resumes_to_the_same_profile(tiny, tmp_path):
    ds = load_dataset("embedded", limit=10)
    opts = ProfileOptions(max_new_tokens=4, checkpoint_every=2, calibration_prompts=3, samples=6)
    whole = run_profile(tiny, ds, opts).profile
    out = tmp_path / "prof"

    def stop_after_5(done, total, tokens):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(tiny, ds, opts, out=out, progress=stop_after_5)
    assert not out.exists()  # no half-written profile
    ck = default_checkpoint_dir(out)
    assert (ck / "rank0-of-1.safetensors").is_file() and (ck / "calibration.json").is_file()
    res = run_profile(tiny, ds, opts, out=out)
    assert res.resumed_from == 4  # the checkpoint after prompt 4
    same_counts(Profile.load(out, with_samples=True), whole)
    for k in ("x", "mask", "phase"):
        np.testing.assert_array_equal(res.profile.samples[k], whole.samples[k])
    assert not ck.exists()  # removed once the profile is written


def test_checkpoint_of_another_run_is_refused(tiny, tmp_path):
    ds = load_dataset("embedded", limit=6)
    out = tmp_path / "prof"

    def stop(done, total, tokens):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(tiny, ds, ProfileOptions(max_new_tokens=2, checkpoint_every=1), out=out, progress=stop)
    other = ProfileOptions(max_new_tokens=3, checkpoint_every=1)
    with pytest.raises(InputError, match="different run"):
        run_profile(tiny, ds, other, out=out)
    run_profile(tiny, ds, ProfileOptions(max_new_tokens=3, checkpoint_every=1, resume=False), out=out)
    assert Profile.load(out).manifest["generation"]["max_new_tokens"] == 3


def test_truncation_to_context():
    src = load_source("random:tiny:max_seq_len=64")
    seqs = [PromptTokens("long", tuple(range(3, 103)), tuple(range(3, 23)))]
    p = run_profile(src, seqs, ProfileOptions(mode="teacher-forced")).profile
    assert p.token_count == {"prefill": 64, "decode": 0}
    assert p.manifest["run"]["truncated_prompts"] == 1
    p = run_profile(src, [PromptTokens("long", tuple(range(3, 103)))], ProfileOptions(max_new_tokens=8)).profile
    assert p.token_count == {"prefill": 63, "decode": 0}


# ---- synth, import-powerinfer, show ----------------------------------------------------------------

def test_synth_profile_parameters():
    from hotcold.model.config import shape
    from hotcold.profiler.stats import gini
    from hotcold.profiler.synth import synth_profile

    cfg = shape("smollm2-135m")
    p = synth_profile(cfg, skew="0:2", seed=1, density=0.2, prefill_tokens=0, decode_tokens=20_000)
    assert p.active_count.shape == (30, 1536) and p.active_count.dtype == np.int64
    f = p.frequencies()
    assert np.allclose(f.mean(1), 0.2, atol=0.005)
    g = [gini(c) for c in p.active_count_decode]
    assert g[0] < 0.05 < g[15] < g[29]  # skew 0 is uniform; more skew, more concentrated
    assert abs(p.magnitude_threshold(3, 0.8) - 0.05) < 0.002  # histograms agree with the density
    assert p.fingerprint == load_source("random:smollm2-135m").fingerprint
    same_counts(p, synth_profile(cfg, skew="0:2", seed=1, density=0.2, prefill_tokens=0, decode_tokens=20_000))
    assert not np.array_equal(p.active_count, synth_profile(cfg, skew="0:2", seed=2, density=0.2).active_count)
    with pytest.raises(InputError, match="values for 30 layers"):
        synth_profile(cfg, skew="1,2")


def test_import_powerinfer_integer_layer_order(tmp_path):
    src = load_source("random:tiny:n_layers=12")
    for i in range(12):  # layer i's counts are all i, so a string sort (10 before 2) would show
        torch.save(torch.full((256,), float(i)), tmp_path / f"activation_{i}.pt")
    r = runner.invoke(app, ["profile", "import-powerinfer", str(tmp_path), "-m", "random:tiny:n_layers=12",
                            "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    p = Profile.load(tmp_path / "out")
    np.testing.assert_array_equal(p.active_count[:, 0], np.arange(12))
    assert p.token_count["unknown"] and p.token_count["prefill"] is None
    assert p.fingerprint == src.fingerprint
    assert math.isclose(p.frequencies()[11, 0], 1.0)  # normalised by the largest count
    from hotcold.profiler.powerinfer import import_powerinfer

    assert import_powerinfer(tmp_path, src, tokens=100).frequencies()[11, 0] == 0.11
    (tmp_path / "activation_5.pt").unlink()
    r = runner.invoke(app, ["profile", "import-powerinfer", str(tmp_path), "-m", "random:tiny:n_layers=12",
                            "-o", str(tmp_path / "out2")])
    assert r.exit_code == 2 and "missing layers [5]" in r.output
    assert not (tmp_path / "out2").exists()


def test_show_summary_and_plot(tiny, tasks, tmp_path):
    run_profile(tiny, tasks, ProfileOptions(max_new_tokens=3), out=tmp_path / "p")
    r = runner.invoke(app, ["profile", "show", str(tmp_path / "p"), "--json", "--plot", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert len(s["layers"]) == 4 and 0 < s["layers"][0]["cover_neurons"] <= 256
    assert 0.0 <= s["layers"][0]["gini"] < 1.0 and abs(s["mean_sparsity"] - 0.5) < 0.1
    assert (tmp_path / "f.png").stat().st_size > 1000
    r = runner.invoke(app, ["profile", "show", str(tmp_path / "p")])
    assert r.exit_code == 0 and "neurons for 80%" in r.stdout and "Gini" in r.stdout


def test_coverage_and_gini_definitions():
    from hotcold.profiler.stats import gini, neurons_covering

    assert gini(np.ones(10)) == 0.0 and abs(gini(np.r_[np.zeros(9), 1.0]) - 0.9) < 1e-12
    assert neurons_covering(np.array([5, 3, 1, 1]), 0.8) == 2 and neurons_covering(np.zeros(3)) == 0


# ---- bad input through the CLI: one line, non-zero exit, nothing written ----------------------------

def run_cli(tmp_path, *args):
    r = runner.invoke(app, ["profile", "run", "-m", TINY, "-o", str(tmp_path / "out"), "--no-progress", *args])
    assert not (tmp_path / "out").exists()
    return r


@pytest.mark.parametrize("args,code,message", [
    (["-d", "mbpp:/nonexistent/mbpp.jsonl"], 2, "dataset file not found: /nonexistent/mbpp.jsonl"),
    (["-d", "embedded", "--split", "test", "--offset", "500"], 2, "no tasks selected"),
    (["-d", "embedded", "--split", "validation"], 2, "no split 'validation'"),
    (["-d", "embedded", "--stream"], 2, "--stream (layer by layer) needs --mode teacher-forced"),
    (["-d", "embedded", "--threshold", "0.1", "--sparsity", "0.5"], 2, "both --threshold and --sparsity"),
    (["-d", "embedded", "-a", "relu"], 2, "--activation relu counts a_i != 0"),
    (["-d", "embedded", "--mode", "sideways"], 2, "unknown mode 'sideways'"),
    (["-d", "embedded", "-a", "magnitude"], 2, "called product now"),
    (["-d", "embedded", "-a", "gate"], 2, "export --rule gate"),
])
def test_run_bad_input(tmp_path, args, code, message):
    r = run_cli(tmp_path, *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert r.stderr.count("error:") == 1


def test_empty_jsonl_dataset(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"nope": 1}\n')
    r = run_cli(tmp_path, "-d", f"jsonl:{tmp_path / 'p.jsonl'}")
    assert r.exit_code == 2 and "no tasks selected" in r.stderr


def test_merge_refuses_profile_of_another_model(tiny, tasks, tmp_path):
    opts = ProfileOptions(max_new_tokens=2, activation=ActivationSpec(threshold=0.1))
    run_profile(tiny, tasks, opts, out=tmp_path / "a")
    run_profile(load_source("random:tiny:max_seq_len=1024,seed=1"), tasks, opts, out=tmp_path / "b")
    r = runner.invoke(app, ["profile", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 3
    assert "differ in model" in r.stderr and "merge only profiles of the same model" in r.stderr
    assert not (tmp_path / "m").exists()


def test_show_refuses_altered_profile(tiny, tasks, tmp_path):
    run_profile(tiny, tasks, ProfileOptions(max_new_tokens=2), out=tmp_path / "p")
    with open(tmp_path / "p" / "counts.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    r = runner.invoke(app, ["profile", "show", str(tmp_path / "p")])
    assert r.exit_code == 3 and "altered" in r.stderr


def test_hist_index_matches_edges():
    edges = hist_edges()
    mids = np.sqrt(edges[:-1] * edges[1:])  # one value inside each log-spaced bin
    idx = hist_index(torch.tensor(np.r_[0.0, 1e-7, mids, 2e4], dtype=torch.float32)).numpy()
    np.testing.assert_array_equal(idx, np.r_[0, 0, np.arange(1, len(edges)), len(edges)])


def test_old_activation_names_in_a_manifest_read_as_todays():
    from hotcold.profiler.activation import kind_of

    assert [kind_of({"kind": k}) for k in ("magnitude", "gate", "product", "sign", "relu")] == \
        ["product", "sign", "product", "sign", "relu"]
    assert kind_of(None) is None
