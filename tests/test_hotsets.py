"""Per-sequence profiling records and the hot-set measurement (`profile hotsets`), on the hand-built model
(exact counts) and the tiny random LLaMA (seconds); the skew figures of `profile show`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.errors import IncompatibleError, InputError
from hotcold.profiler.activation import ActivationSpec
from hotcold.profiler.artifact import Profile, merge
from hotcold.profiler.engine import ProfileOptions, run_profile
from hotcold.profiler.hotsets import (
    CHOICES, DynamicRule, HotsetOptions, dynamic_defaults, measure_hotsets, replay_dynamic,
)
from hotcold.profiler.persequence import decode_counts
from hotcold.profiler.sequences import PromptTokens
from hotcold.profiler.stats import caught_by, coverage, summary
from hotcold.workloads import load_dataset
from test_profiler import SEQS, hand_source  # the hand-built model whose activations are known exactly

TINY = "random:tiny:max_seq_len=1024"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    from hotcold.model.registry import load_source

    return load_source(TINY)


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    """(train profile, evaluation profile with per-sequence records and the train profile's thresholds)."""
    d = tmp_path_factory.mktemp("hotsets")
    base = dict(mode="teacher-forced", batch_size=4)
    train = run_profile(tiny, load_dataset("embedded", "train", limit=12), ProfileOptions(**base), out=d / "train").profile
    spec = ActivationSpec("product", thresholds=tuple(train.manifest["activation"]["thresholds"]))
    run_profile(tiny, load_dataset("embedded", "test", limit=10),
                ProfileOptions(activation=spec, per_sequence=True, per_sequence_block=8, **base), out=d / "eval")
    return Profile.load(d / "train"), Profile.load(d / "eval", with_sequences=True)


# ---- per-sequence records ---------------------------------------------------------------------------

def test_hand_model_per_sequence_counts_are_exact():
    # gate rule on the hand model: layer 0 fires neuron t on token t only, layer 1 every neuron but t
    p = run_profile(hand_source(), SEQS, ProfileOptions(mode="teacher-forced", activation=ActivationSpec("sign"),
                                                         batch_size=2, per_sequence=True, per_sequence_block=2)).profile
    sq = p.sequences
    onehot = lambda toks: np.bincount(np.asarray(toks), minlength=4)  # noqa: E731
    np.testing.assert_array_equal(sq["prefill"][0, 0], onehot([0, 1, 1]))  # "a": prompt (0, 1, 1)
    np.testing.assert_array_equal(sq["prefill"][1, 0], onehot([3]))
    np.testing.assert_array_equal(sq["prefill"][0, 1], 3 - onehot([0, 1, 1]))
    # continuations in blocks of 2: "a" (2, 3) is one block, "b" (0, 0, 2) two, the last one token long
    assert sq["block_seq"].tolist() == [0, 1, 1] and sq["block_tokens"].tolist() == [2, 2, 1]
    np.testing.assert_array_equal(sq["blocks"][:, 0], [onehot([2, 3]), onehot([0, 0]), onehot([2])])
    np.testing.assert_array_equal(sq["blocks"][:, 1], [2 - onehot([2, 3]), 2 - onehot([0, 0]), 1 - onehot([2])])
    assert sq["tokens"].tolist() == [[3, 2], [1, 3]]
    assert p.manifest["sequences"] == {"n": 2, "block": 2, "ids": ["a", "b"]}


@pytest.mark.parametrize("kw", [{"mode": "teacher-forced"}, {"mode": "teacher-forced", "stream": True},
                                {"mode": "generate", "max_new_tokens": 9}])
@pytest.mark.parametrize("kind", ["product", "sign"])
def test_per_sequence_records_add_up_and_leave_the_counts_alone(tiny, kw, kind):
    ds = load_dataset("embedded", limit=5)
    opts = ProfileOptions(activation=ActivationSpec(kind), batch_size=2, **kw)
    plain = run_profile(tiny, ds, opts).profile
    p = run_profile(tiny, ds, replace(opts, per_sequence=True, per_sequence_block=4)).profile
    np.testing.assert_array_equal(p.active_count_prefill, plain.active_count_prefill)
    np.testing.assert_array_equal(p.active_count_decode, plain.active_count_decode)
    np.testing.assert_array_equal(p.hist_decode, plain.hist_decode)
    np.testing.assert_array_equal(p.sequences["prefill"].sum(0, dtype=np.int64), p.active_count_prefill)
    np.testing.assert_array_equal(decode_counts(p.sequences).sum(0), p.active_count_decode)
    assert p.sequences["tokens"].sum(0).tolist() == [p.token_count["prefill"], p.token_count["decode"]]
    assert p.manifest["sequences"]["ids"] == [t.id for t in ds.tasks]


def test_per_sequence_survives_save_load_merge_and_resume(tiny, tmp_path):
    ds = load_dataset("embedded", limit=8)
    opts = ProfileOptions(mode="teacher-forced", batch_size=2, checkpoint_every=2, per_sequence=True)
    whole = run_profile(tiny, ds, opts).profile
    out = tmp_path / "prof"

    def stop(done, total, tokens):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(tiny, ds, opts, out=out, progress=stop)
    res = run_profile(tiny, ds, opts, out=out)
    assert res.resumed_from > 0
    back = Profile.load(out, with_sequences=True)
    for k, v in whole.sequences.items():
        np.testing.assert_array_equal(back.sequences[k], v)
    assert Profile.load(out).sequences == {} and Profile.load(out).has_sequences  # loaded only when asked
    m = merge([back, back])
    assert m.manifest["sequences"]["n"] == 16 and m.sequences["block_seq"].max() == 15
    np.testing.assert_array_equal(decode_counts(m.sequences).sum(0), m.active_count_decode)


def test_per_sequence_bad_input(tiny):
    dup = [PromptTokens("x", (5, 6), (7,)), PromptTokens("x", (8,), (9,))]
    with pytest.raises(InputError, match="unique prompt ids"):
        run_profile(tiny, dup, ProfileOptions(mode="teacher-forced", per_sequence=True))
    with pytest.raises(InputError, match="per-sequence-block"):
        ProfileOptions(per_sequence=True, per_sequence_block=0).validate()


# ---- the hot-set measurement -------------------------------------------------------------------------

def _naive(train: Profile, ev: Profile, k: int) -> dict[str, float]:
    """The per-layer choices, computed the obvious way (loops, no cumulative sums)."""
    f = train.frequencies("decode")
    per = decode_counts(ev.sequences).astype(np.int64)
    S, L, F = per.shape
    work = per.sum(0)
    got = {"profile": 0, "prompt": 0, "oracle": 0, "oracle-workload": 0}
    for l in range(L):
        got["profile"] += work[l, np.argsort(-f[l], kind="stable")[:k]].sum()
        got["oracle-workload"] += np.sort(work[l])[::-1][:k].sum()
        for s in range(S):
            pre = ev.sequences["prefill"][s, l].astype(np.float64)
            key = sorted(range(F), key=lambda i: (-pre[i], -f[l, i], i))[:k]
            got["prompt"] += per[s, l, key].sum()
            got["oracle"] += np.sort(per[s, l])[::-1][:k].sum()
    return {c: v / work.sum() for c, v in got.items()}


def test_hotsets_match_a_direct_computation(pair):
    train, ev = pair
    r = measure_hotsets(train, ev, HotsetOptions(shares=(0.1, 0.3)))
    F = train.n_ff
    for i, s in enumerate(r["shares"]):
        k = round(s * F)
        for c, v in _naive(train, ev, k).items():
            assert r["overall"][c][i] == pytest.approx(v, abs=1e-12), c
        assert r["overall"]["random"][i] == pytest.approx(k / F)
        # the per-sequence oracle is an upper bound of every static per-layer choice of the same size
        for c in ("profile", "prompt", "oracle-workload"):
            assert r["overall"][c][i] <= r["overall"]["oracle"][i] + 1e-12
        # fixed and adaptive hold what the solver chose, which fits the budget
        for pol in ("fixed", "adaptive"):
            assert sum(r["n_hot"][pol][i]) <= round(s * F * train.n_layers)
    assert set(r["overall"]) == set(CHOICES)
    assert all(0.0 <= v <= 1.0 for c in CHOICES for v in r["overall"][c])
    # a per-prompt placement copies in, per sequence, the neurons of its top set its predecessor lacked
    f = train.frequencies("decode")
    L, S = train.n_layers, ev.sequences["prefill"].shape[0]
    for i, s in enumerate(r["shares"]):
        k = round(s * F)
        moved, prev = 0, [set(np.argsort(-f[l], kind="stable")[:k].tolist()) for l in range(L)]
        for q in range(S):
            cur = []
            for l in range(L):
                pre = ev.sequences["prefill"][q, l].astype(np.float64)
                cur.append(set(sorted(range(F), key=lambda j: (-pre[j], -f[l, j], j))[:k]))
                moved += len(cur[l] - prev[l])
            prev = cur
        assert r["prompt_moved_per_sequence"][i] == pytest.approx(moved / (S * L * F), abs=1e-12)
    json.dumps(r)  # JSON-able as returned


def test_dynamic_replay_without_swaps_is_its_fixed_start(pair):
    train, ev = pair
    r0 = measure_hotsets(train, ev, HotsetOptions(shares=(0.2,), dynamic={"max_swaps": 0}))
    assert r0["overall"]["dynamic"] == r0["overall"]["fixed"] and r0["dynamic"][0]["swaps"] == 0


def test_dynamic_rule_moves_a_neuron_that_turns_hot():
    from hotcold.model.config import shape
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    cfg = shape("tiny")
    L, F = cfg.n_layers, cfg.n_ff
    cm = CostModel(cfg, preset("pc-high"), "float16")
    prior = np.full((L, F), 0.2)
    prior[:, 0] = 0.9  # neuron 0 hot at the start, neuron 1 cold
    rule = DynamicRule(every=16)
    blocks = np.zeros((12, L, F), np.uint8)
    blocks[:, :, 1] = 16  # neuron 1 fires on every token, neuron 0 never
    res = replay_dynamic(rule, prior, [np.array([0])] * L, blocks, np.full(12, 16), cm)
    assert all(1 in h and 0 not in h for h in res["final_hot"])
    assert res["swaps"] == L
    # caught: nothing while neuron 0 held the slot, everything once neuron 1 did
    assert 0 < res["caught"].sum() < res["total"].sum()


def test_dynamic_defaults_come_from_the_runtime():
    d, where = dynamic_defaults()
    assert where.endswith("dynamic.py")
    assert {"every", "alpha", "hysteresis", "max_swaps", "margin"} <= set(d)


def test_hotsets_refuses_mismatched_inputs(pair, tmp_path):
    train, ev = pair
    with pytest.raises(InputError, match="per-sequence"):
        measure_hotsets(train, train)
    other = replace(ev, manifest={**ev.manifest, "model": {**ev.manifest["model"], "fingerprint": "other"}})
    with pytest.raises(IncompatibleError, match="another model"):
        measure_hotsets(train, other)
    with pytest.raises(InputError, match="fractions"):
        measure_hotsets(train, ev, HotsetOptions(shares=(0.0,)))


def test_hotsets_cli_profiles_the_eval_and_writes_the_report(pair, tmp_path):
    train, _ = pair
    out, saved = tmp_path / "hot", tmp_path / "ev"
    r = runner.invoke(app, ["profile", "hotsets", str(train.path), "--eval", "embedded", "--eval-split", "test",
                            "--eval-limit", "4", "-m", TINY, "--shares", "0.1,0.5", "--save-eval", str(saved), "-o", str(out),
                            "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["shares"] == [0.1, 0.5] and res["sequences"] == 4
    assert {p.name for p in out.iterdir()} == {"hotsets.json", "hotsets.png", "report.md"}
    assert "| oracle (per sequence) |" in (out / "report.md").read_text()
    ev = Profile.load(saved, with_sequences=True)  # evaluated with the profile's own thresholds
    assert ev.manifest["activation"]["thresholds"] == train.manifest["activation"]["thresholds"]
    r = runner.invoke(app, ["profile", "hotsets", str(train.path), "--eval", str(train.path), "--no-progress"])
    assert r.exit_code == 2 and "no per-sequence records" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["profile", "hotsets", str(train.path), "--eval", str(saved), "--shares", "0.1,x"])
    assert r.exit_code == 2 and "--shares" in r.output


# ---- skew figures ------------------------------------------------------------------------------------

def test_coverage_and_catch_figures():
    c = np.array([6, 3, 1, 0, 0, 0, 0, 0, 0, 0])
    assert coverage(c, (0.1, 0.2, 0.5)) == [0.6, 0.9, 1.0]
    ref = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # top 20%: neurons 9 and 8
    tgt = np.array([[5, 0, 0, 0, 0, 0, 0, 0, 1, 4]])
    assert caught_by(ref, tgt, 0.2)[0] == pytest.approx(5 / 9)  # 1 + 4 of the best 5 + 4


def test_show_reports_halves_and_against(pair):
    train, ev = pair
    s = summary(ev, "decode", against=train)
    st = s["stability"]
    assert st["halves"]["sequences"] == [5, 5]
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in st["halves"]["relative_catch"])
    assert 0.0 < st["against"]["catch"] <= 1.0
    assert s["coverage"]["0.2"] == pytest.approx(
        sum(coverage(c, (0.2,))[0] * c.sum() for c in ev.active_count_decode) / ev.active_count_decode.sum())
    assert summary(train)["stability"]["halves"] is None  # no per-sequence records
    r = runner.invoke(app, ["profile", "show", str(ev.path), "--against", str(train.path)])
    assert r.exit_code == 0, r.output
    assert "stability across halves (5 + 5 prompts)" in r.output and "coverage curve" in r.output


def test_smallest_is_the_stable_argsort_prefix():
    """The dynamic rule's O(n) selection picks exactly what a stable argsort would, ties included."""
    from hotcold.workloads.frequencies import smallest

    rng = np.random.default_rng(0)
    for t in range(400):
        n = int(rng.integers(1, 60))
        v = rng.integers(0, 5, n).astype(float) if t % 2 else rng.random(n)  # many ties, or none
        m = int(rng.integers(0, n + 3))
        assert np.array_equal(smallest(v, m), np.argsort(v, kind="stable")[:m])
