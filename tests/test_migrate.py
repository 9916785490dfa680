"""Moving quantized neurons between the GPU slots and the CPU slots (hotcold.runtime.migrate): the bytes of
a neuron survive the trip both ways, and in exact mode the model computes the same whatever moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hotcold.errors import InputError
from hotcold.model.config import shape
from hotcold.quant import parse_format, random_qtensor, hcat
from hotcold.runtime import build
from hotcold.runtime.migrate import rehome, split_cols, swap_neurons

IDS = [[1, 5, 9, 2, 7, 3]]


@pytest.mark.parametrize("q", ["q4", "q4a", "q8"])
def test_split_cols_inverts_hcat(q):
    fmt = parse_format(q)
    a, b = random_qtensor(5, 64, fmt, seed=1), random_qtensor(5, 96, fmt, seed=2)
    x, y = split_cols(hcat(a, b), 64)
    assert torch.equal(x.packed, a.packed) and torch.equal(y.packed, b.packed)


def _model(q, monkeypatch, cold_mode="exact"):
    monkeypatch.setattr(build, "CHUNK", 24)  # the chunked generation path, at toy size
    cfg = shape("tiny")
    n_hot = [cfg.n_ff // 4, cfg.n_ff // 2, 0, cfg.n_ff - 1][: cfg.n_layers]
    n_hot += [cfg.n_ff // 3] * (cfg.n_layers - len(n_hot))
    return build.random_quantized_model(cfg, n_hot, q, device="cpu", max_len=32, cold_mode=cold_mode,
                                        cpu_backend="torch", seed=3)


def _snapshot(eng):
    """Each neuron's bytes, by id: (gate row, up row, down column) wherever it lives."""
    from hotcold.quant import QTensor

    D, out = eng.cfg.dim, []
    for g, c in zip(eng.gl, eng.cl):
        rows = {}
        gu = g.hot_gu.packed
        for s, n in enumerate(g.hot_ids):
            rows[int(n)] = (gu[2 * s].clone(), gu[2 * s + 1].clone(), g.hot_down.packed[s].clone())
        if c.n_cold:
            up, down = split_cols(QTensor(c.up_down.packed, c.gate.fmt, (c.n_cold, 2 * D)), D)
            for j, n in enumerate(c.cold_ids):
                rows[int(n)] = (c.gate.packed[j].clone(), up.packed[j].clone(), down.packed[j].clone())
        out.append(rows)
    return out


@pytest.mark.parametrize("q", ["q4", "q4a"])
def test_swap_keeps_every_neuron_and_the_output(q, monkeypatch):
    eng = _model(q, monkeypatch)
    x = torch.tensor(IDS)
    before, snap = eng.forward(x), _snapshot(eng)
    rng = np.random.default_rng(0)
    moved = 0
    for l in range(eng.L):
        m = min(eng.gl[l].n_hot, eng.cl[l].n_cold, 7)
        hs = rng.choice(eng.gl[l].n_hot, m, replace=False) if m else np.zeros(0, np.int64)
        cs = rng.choice(eng.cl[l].n_cold, m, replace=False) if m else np.zeros(0, np.int64)
        want_hot = set(eng.gl[l].hot_ids.tolist()) - set(eng.gl[l].hot_ids[hs].tolist()) | set(eng.cl[l].cold_ids[cs].tolist())
        b = swap_neurons(eng, l, hs, cs)
        assert b == 2 * m * 3 * eng.cl[l].gate.fmt.row_bytes(eng.cfg.dim)
        assert set(eng.gl[l].hot_ids.tolist()) == want_hot
        assert torch.equal(eng.hot_ids_dev[l].cpu(), torch.as_tensor(eng.gl[l].hot_ids))
        moved += m
    assert moved > 0
    after = _snapshot(eng)
    for l in range(eng.L):
        assert after[l].keys() == snap[l].keys()
        for n, rows in snap[l].items():
            assert all(torch.equal(a, b) for a, b in zip(rows, after[l][n])), (l, n)
    torch.testing.assert_close(eng.forward(x), before, rtol=1e-4, atol=1e-4)


def test_rehome_there_and_back(monkeypatch):
    eng = _model("q4", monkeypatch)
    x = torch.tensor(IDS)
    before = eng.forward(x)
    l = 0
    orig = eng.gl[l].hot_ids.copy()
    rng = np.random.default_rng(1)
    new = rng.choice(eng.cfg.n_ff, len(orig), replace=False)
    st = rehome(eng, l, new)
    assert set(eng.gl[l].hot_ids.tolist()) == set(new.tolist())
    assert st.neurons == len(set(new.tolist()) - set(orig.tolist())) > 0
    torch.testing.assert_close(eng.forward(x), before, rtol=1e-4, atol=1e-4)
    back = rehome(eng, l, orig)
    assert back.neurons == st.neurons and set(eng.gl[l].hot_ids.tolist()) == set(orig.tolist())
    with pytest.raises(InputError, match="hot slots"):
        rehome(eng, l, orig[:-1])


def test_dynamic_placement_moves_quantized_neurons_and_keeps_exact_output(monkeypatch):
    """DynamicPlacement on a q4 model: an EMA prior that says the cold neurons are the hot ones makes it
    swap them in while generating (swap_neurons' byte copies), and exact mode still computes what it did."""
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    eng = _model("q4", monkeypatch)
    cfg = eng.cfg
    x = torch.tensor(IDS)
    ref = eng.forward(x)
    snap = _snapshot(eng)
    prior = np.zeros((cfg.n_layers, cfg.n_ff))
    for l in range(cfg.n_layers):
        prior[l][eng.cl[l].cold_ids] = 1.0  # the placement looks backwards: every cold neuron looks hotter
    was_hot = [set(g.hot_ids.tolist()) for g in eng.gl]
    cm = CostModel(cfg, preset("h200"), "q4", cold_mode="threshold", ctx_len=32)
    dyn = DynamicPlacement(eng, cm, prior, every=2, alpha=0.1, max_swaps=8, horizon=10**6, margin=0.0)
    eng.step(1)
    for _ in range(8):
        eng.step(None)
    dyn.flush()
    assert dyn.stats.neurons > 0 and dyn.stats.bytes == dyn.stats.neurons * 2 * 3 * eng.cl[0].gate.fmt.row_bytes(cfg.dim)
    assert any(set(g.hot_ids.tolist()) != h for g, h in zip(eng.gl, was_hot))
    assert [g.n_hot for g in eng.gl] == [len(h) for h in was_hot]  # the GPU memory holds still
    after = _snapshot(eng)
    for l in range(cfg.n_layers):  # every neuron's bytes, wherever it went
        assert all(torch.equal(a, b) for n, rows in snap[l].items() for a, b in zip(rows, after[l][n]))
    eng.reset()
    torch.testing.assert_close(eng.forward(x), ref, rtol=1e-4, atol=1e-4)
    assert dyn.stats.to_json(9)["bytes_per_token"] > 0


def test_dynamic_placement_fed_from_outside_moves_what_the_counts_say(monkeypatch):
    """observe() + decide() + migrate(): the study's in-loop path (counts from a replayed trace, not from
    the engine's counters). Frequencies that call every cold neuron hot move neurons at once, and the
    model still computes what it did."""
    from hotcold.runtime.dynamic import DynamicPlacement
    from hotcold.solver.costmodel import CostModel
    from hotcold.solver.hardware import preset

    eng = _model("q4", monkeypatch)
    cfg = eng.cfg
    x = torch.tensor(IDS)
    ref = eng.forward(x)
    prior = np.zeros((cfg.n_layers, cfg.n_ff))
    for l in range(cfg.n_layers):
        prior[l][eng.gl[l].hot_ids] = 0.5
    cm = CostModel(cfg, preset("h200"), "q4", cold_mode="threshold", ctx_len=32)
    dyn = DynamicPlacement(eng, cm, prior, every=16, alpha=0.5, max_swaps=4, horizon=10**6, margin=0.0)
    dyn.enabled, eng.stats_on = False, False
    was_hot = [set(g.hot_ids.tolist()) for g in eng.gl]
    dyn.migrate(dyn.decide())  # the prior alone: nothing looks hotter than the hot set
    assert dyn.stats.neurons == 0 and dyn.stats.decisions == 1
    block = np.zeros((cfg.n_layers, cfg.n_ff))
    for l in range(cfg.n_layers):
        block[l][eng.cl[l].cold_ids] = 1.0
    dyn.observe(block)
    assert np.allclose(dyn.ema[0][eng.cl[0].cold_ids], 0.5)  # (1 - alpha) * 0 + alpha * 1
    dyn.migrate(dyn.decide())
    moved = [len(set(g.hot_ids.tolist()) - h) for g, h in zip(eng.gl, was_hot)]
    assert dyn.stats.neurons == sum(moved) > 0 and max(moved) <= 4  # at most max_swaps a layer
    with pytest.raises(ValueError):
        dyn.observe(block[:, :-1])
    eng.reset()
    torch.testing.assert_close(eng.forward(x), ref, rtol=1e-4, atol=1e-4)
