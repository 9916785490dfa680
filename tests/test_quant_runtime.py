"""Quantized Bundles end to end on the tiny random model: export (manifest metadata and provenance, account
bytes = file bytes), the reader's checks, and the runtime: exact mode == the dense model over the same
dequantized weights (float64 reference, tests/fp64_util.py), threshold mode == the dense model with the
same neurons zeroed, decode == batched forward, quantized models built without a Bundle, `hotcold run`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hotcold.bundle import Bundle, seal_manifest
from hotcold.errors import HotcoldError, InputError
from hotcold.exporter.export import ExportOptions, export_bundle
from hotcold.model.dense import DenseModel
from hotcold.model.generate import generate
from hotcold.model.weights import TensorDictSource
from hotcold.quant import dequantize, parse_format, quantize
from hotcold.runtime import load
from hotcold.runtime.build import from_source, random_quantized_model
from tests.fp64_util import assert_as_exact_as_dense
from tests.hybrid_util import frequency_order, make_placement, tiny_profile

PLACEMENTS = {"all_gpu": [256] * 4, "all_cpu": [0] * 4, "split": [0, 64, 200, 256]}
IDS = [1, 17, 200, 33, 4, 99, 123, 7, 45, 300, 12, 8]
F32 = torch.float32
FP32_KV = dict(kv_dtype=torch.float32)  # the dense reference keeps K/V in float32 too


@pytest.fixture(scope="module")
def src():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def profile(src):
    return tiny_profile(src)


@pytest.fixture(scope="module")
def bundles(src, profile, tmp_path_factory):
    """(placement, rule, format) -> q bundle path (bundled CPU layout, thresholds at 50% sparsity)."""
    root = tmp_path_factory.mktemp("qbundles")
    order = frequency_order(profile)
    out = {}
    cases = [(n, r, "q4") for n in PLACEMENTS for r in ("gate", "product")] + [("split", "gate", f) for f in ("q8", "q4a")]
    for name, rule, q in cases:
        p = root / f"{name}-{rule}-{q}"
        export_bundle(src, make_placement(src, PLACEMENTS[name], order), p, profile=profile,
                      options=ExportOptions(dtype=q, rule=rule, sparsity=0.5))
        out[name, rule, q] = p
    return out


def dequantized_source(src, q: str) -> TensorDictSource:
    """The float model whose weights are exactly what a `q` Bundle of src holds (dequantized): every matrix
    quantized as the exporter does (the down projection by neuron, i.e. along D), the embedding float16."""
    f = parse_format(q)
    cfg = src.config

    def rt(w: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(w.float().contiguous(), f.bits, f.group, f.asym))

    t = {"tok_embeddings": src.embedding(torch.float16).float(), "norm": src.get("norm")}
    if not cfg.tie_embeddings:
        t["output"] = rt(src.lm_head())
    for i in range(cfg.n_layers):
        for k, w in src.layer(i).items():
            name = f"layers.{i}.{k}"
            if k in ("attn_norm", "ffn_norm") or k.startswith("b"):
                t[name] = w
            elif k == "w_down":
                t[name] = rt(w.t()).t().contiguous()
            else:
                t[name] = rt(w)
    return TensorDictSource(cfg, t, f"{src.description} dequantized from {q}")


@pytest.fixture(scope="module")
def dq(src):
    """format -> (dense fp32, dense fp64) over the dequantized weights."""
    out = {}
    for q in ("q4", "q8", "q4a"):
        s = dequantized_source(src, q)
        out[q] = (DenseModel.from_source(s), DenseModel.from_source(s, dtype=torch.float64))
    return out


# ---- export ---------------------------------------------------------------------------------------
def test_manifest_records_every_quantized_tensor(bundles):
    b = Bundle.load(bundles["split", "gate", "q4"])
    m = b.manifest
    assert m["dtype"] == "q4_g32" and m["cpu_layout"] == "bundled"
    q = m["quant"]
    assert q["embedding"] == "float16" and q["small"] == "float32" and q["source"] == "float weights"
    for name, t in {**b.gpu, **b.cpu}.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("wqkv", "wo", "output", "hot_gate_up", "hot_down", "cold_gate", "cold_up_down"):
            meta = q["tensors"][name]
            assert meta["format"] == "q4_g32" and meta["shape"] == list(t.shape)
            assert set(meta["provenance"].values()) == {"quantized"}
            assert t.nbytes == t.shape[0] * parse_format("q4").row_bytes(t.shape[1])
        else:
            assert name not in q["tensors"]
            assert t.dtype == (torch.float16 if name == "tok_embeddings" else torch.float32)
    assert q["tensors"]["layers.1.cold_up_down"]["provenance"] == {"w_up": "quantized", "w_down": "quantized"}


def test_account_bytes_are_file_bytes(bundles):
    """The memory account (hotcold.memory over QFormat.row_bytes) prices exactly the bytes in the files."""
    for key in (("split", "gate", "q4"), ("split", "gate", "q8"), ("split", "gate", "q4a")):
        b = Bundle.load(bundles[key])
        acct = b.account(64)
        def size(d):
            return sum(t.nbytes if hasattr(t, "fmt") else t.numel() * t.element_size() for t in d.values())
        ffn_gpu = sum(b.gpu[f"layers.{i}.{n}"].nbytes for i in range(4) for n in ("hot_gate_up", "hot_down"))
        assert ffn_gpu == acct.gpu["ffn_hot"] and size(b.cpu) == acct.cpu["ffn_cold"]
        dense = acct.gpu["attention"] + acct.gpu["norms"] + acct.gpu["embedding"] + acct.gpu["lm_head"] + acct.gpu["final_norm"]
        assert size(b.gpu) - ffn_gpu == dense
        # and the file sizes on disk: data bytes + the safetensors header
        for rec in b.manifest["files"]:
            if rec["path"] == "cpu.safetensors":
                assert os.path.getsize(b.path / rec["path"]) >= size(b.cpu)
        full = b.account(64).gpu_total
        fp16 = Bundle.load(bundles[key]).account(64)  # the same call, for symmetry with float bundles
        assert full == fp16.gpu_total


def test_quantized_solver_prices_quantized_bytes(src):
    from hotcold.memory import neuron_bytes, placement_bytes

    cfg = src.config
    assert neuron_bytes(cfg, "q4").total == 3 * 36 and neuron_bytes(cfg, "q4a").total == 3 * 40
    a4 = placement_bytes(cfg, [64] * 4, "q4", ctx_len=64)
    a16 = placement_bytes(cfg, [64] * 4, "fp16", ctx_len=64)
    assert a4.gpu["ffn_hot"] * 128 == a16.gpu["ffn_hot"] * 36  # 36 bytes per 64 values vs 128
    assert a4.gpu["embedding"] == a16.gpu["embedding"]  # the embedding stays float16
    assert a4.gpu["kv_cache"] == a16.gpu["kv_cache"]  # float16 KV cache


def test_split_layout_refused_for_quantized(src, tmp_path):
    with pytest.raises(InputError, match="bundled CPU layout"):
        export_bundle(src, make_placement(src, [64] * 4), tmp_path / "b",
                      options=ExportOptions(dtype="q4", cpu_layout="split", sparsity=None))


# ---- the reader refuses bad quantized bundles ------------------------------------------------------
def _tamper(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    seal_manifest(path, m)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["quant"]["tensors"]["layers.0.wo"].update(shape=[64, 32]), "recorded as q4_g32 \\[64, 32\\]"),
    (lambda m: m["quant"]["tensors"]["layers.2.cold_gate"].update(format="q8_g32"), "recorded as q8_g32"),
    (lambda m: m["quant"]["tensors"]["layers.1.hot_down"].update(bits=8), "bits/group/asym|expected uint8"),
    (lambda m: m["quant"]["tensors"].pop("layers.3.wqkv"), "no quantization metadata"),
    (lambda m: m.pop("quant"), "lacks its quant record"),
    (lambda m: m.update(cpu_layout="split"), "must have the bundled CPU layout"),
])
def test_bad_quantized_bundle_refused(bundles, tmp_path, edit, match):
    import shutil

    p = tmp_path / "b"
    shutil.copytree(bundles["split", "gate", "q4"], p)
    _tamper(p, edit)
    with pytest.raises(HotcoldError, match=match) as e:
        Bundle.load(p)
    assert "\n" not in str(e.value) and "re-export" in str(e.value)


# ---- runtime --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("rule", ["gate", "product"])
def test_exact_equals_dequantized_dense(bundles, dq, name, rule):
    """Exact mode on a q4 Bundle is as exact as the dense fp32 model over the same dequantized weights."""
    dense, dense64 = dq["q4"]
    m = load(bundles[name, rule, "q4"], mode="exact", cpu_backend="torch", **FP32_KV)
    x = torch.tensor([IDS])
    assert_as_exact_as_dense(m.forward(x), dense.forward(x), dense64.forward(x), f"{name}/{rule}")
    gd, gr = generate(dense, IDS[:5], 8, keep_logits=True), generate(m, IDS[:5], 8, keep_logits=True)
    assert gd.new_ids == gr.new_ids
    ref = dense64.forward(torch.tensor([IDS[:5] + gd.new_ids]))[0, 4: 4 + len(gd.logits)]
    assert_as_exact_as_dense(torch.stack(gr.logits), torch.stack(gd.logits), ref, f"{name}/{rule}, decode")


@pytest.mark.parametrize("q", ["q8", "q4a"])
def test_exact_other_formats(bundles, dq, q):
    dense, dense64 = dq[q]
    m = load(bundles["split", "gate", q], mode="exact", cpu_backend="torch", **FP32_KV)
    x = torch.tensor([IDS])
    assert_as_exact_as_dense(m.forward(x), dense.forward(x), dense64.forward(x), q)
    gr = generate(m, IDS[:5], 6, keep_logits=True)
    gd = generate(dense, IDS[:5], 6, keep_logits=True)
    assert gd.new_ids == gr.new_ids


def test_default_kv_cache_is_float16_and_close(bundles, dq):
    """Without kv_dtype the KV cache is float16 (what the account prices): close to the reference, not equal."""
    dense, _ = dq["q4"]
    m = load(bundles["split", "gate", "q4"], mode="exact", cpu_backend="torch")
    assert m.kv_dtype == torch.float16 and m.cache.k[0].dtype == torch.float16
    held = m.memory()
    acct = m.account
    assert held["gpu_weights_and_kv"] == acct.gpu_total - acct.gpu["buffers"] - acct.gpu["predictors"]
    assert held["cpu_cold"] == acct.cpu["ffn_cold"]
    x = torch.tensor([IDS])
    torch.testing.assert_close(m.forward(x), dense.forward(x), atol=2e-3, rtol=2e-3)
    rep = m.report()
    assert rep["weights"] == "q4_g32" and rep["kv_dtype"] == "float16"


def _masked_dense_hook(dsrc, bundle, rule):
    ts = bundle.thresholds
    layers = [dsrc.layer(i) for i in range(dsrc.config.n_layers)]
    cold = [bundle.cold_index(i).long() for i in range(dsrc.config.n_layers)]

    def hook(layer, x, a):
        v = F.silu(F.linear(x, layers[layer]["w_gate"])) if rule == "gate" else a
        keep = torch.ones_like(a, dtype=torch.bool)
        keep[..., cold[layer]] = v[..., cold[layer]].abs() > ts[layer]
        return a * keep

    return hook


@pytest.mark.parametrize("rule", ["gate", "product"])
def test_threshold_equals_masked_dequantized_dense(src, bundles, dq, rule):
    dense, _ = dq["q4"]
    dsrc = dequantized_source(src, "q4")
    m = load(bundles["split", rule, "q4"], mode="threshold", prefill="sparse", cpu_backend="torch", **FP32_KV)
    x = torch.tensor([IDS])
    want = dense.forward(x, hook=_masked_dense_hook(dsrc, m.bundle, rule))
    torch.testing.assert_close(m.forward(x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, dense.forward(x), atol=1e-3)  # sparsity changed something
    # decode steps (the cold kernel) agree with the per-token sparse forward
    cache = m.new_cache(1, len(IDS))
    steps = torch.stack([m.forward(torch.tensor([[t]]), i, cache)[0, 0] for i, t in enumerate(IDS)])
    m.prefill(IDS[:1])
    dec = [m.logits.clone()]
    for t in IDS[1:]:
        m.step(t)
        dec.append(m.logits.clone())
    torch.testing.assert_close(torch.stack(dec), steps, atol=1e-4, rtol=1e-4)
    rep = m.report()
    assert 0 < rep["decode"]["active_fraction"] < 1


def test_numba_kernel_in_the_model(bundles):
    """The compiled quantized cold kernel gives the torch kernel's decode logits (gate and product rule)."""
    pytest.importorskip("numba")
    for rule in ("gate", "product"):
        out = {}
        for backend in ("numba", "torch"):
            m = load(bundles["split", rule, "q4"], mode="threshold", cpu_backend=backend, **FP32_KV)
            g = m.generate(IDS[:4], 6, keep_logits=True)
            out[backend] = (g.new_ids, torch.stack(g.logits))
        assert out["numba"][0] == out["torch"][0]
        torch.testing.assert_close(out["numba"][1], out["torch"][1], atol=1e-4, rtol=1e-4)


# ---- without a Bundle ------------------------------------------------------------------------------
def test_from_source_quantized_equals_bundle(src, bundles, profile):
    order = frequency_order(profile)
    pl = make_placement(src, PLACEMENTS["split"], order)
    L = src.config.n_layers
    m1 = from_source(src, [pl.hot_indices(i) for i in range(L)], cold_ids=[pl.cold_indices(i) for i in range(L)],
                     quant="q4", cold_mode="exact", cpu_backend="torch")
    m2 = load(bundles["split", "gate", "q4"], mode="exact", cpu_backend="torch")
    x = torch.tensor([IDS])
    torch.testing.assert_close(m1.forward(x), m2.forward(x), atol=0, rtol=0)
    assert m1.memory() == m2.memory()


def test_random_quantized_model_matches_its_account():
    from hotcold.model.config import shape

    cfg = shape("tiny")
    m = random_quantized_model(cfg, [0, 64, 200, 256], "q4", device="cpu", max_len=64, cold_mode="exact",
                               cpu_backend="torch")
    held, acct = m.memory(), m.account
    assert held["gpu_weights_and_kv"] == acct.gpu_total - acct.gpu["buffers"] - acct.gpu["predictors"]
    assert held["cpu_cold"] == acct.cpu["ffn_cold"]
    g = m.generate([1, 2, 3], 4)
    assert len(g.new_ids) == 4
    logits = m.forward(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()


def test_quantized_model_refuses_float_cold_rows(src):
    from hotcold.runtime.build import split_layer
    from hotcold.runtime.model import HybridModel

    t = src.layer(0)
    gq, cq = split_layer(t, np.arange(10), 256, "cpu", F32, quant="q4")
    _, cf = split_layer(t, np.arange(10), 256, "cpu", F32)
    cfg = src.config.replace(n_layers=1)
    with pytest.raises(InputError, match="quantized cold rows"):
        HybridModel(cfg, src.embedding(torch.float16), src.get("norm"), src.embedding(torch.float16), [gq], [cf])


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_export_and_run_q4(src, profile, tmp_path):
    from typer.testing import CliRunner

    from hotcold.cli import app

    order = frequency_order(profile)
    pl = make_placement(src, PLACEMENTS["split"], order)
    pl.save(tmp_path / "pl")
    r = CliRunner().invoke(app, ["export", "--model", "random:tiny", "--placement", str(tmp_path / "pl"), "--dtype", "q4",
                                 "--threshold", "0.05", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"] == "q4_g32"
    r = CliRunner().invoke(app, ["run", str(tmp_path / "b"), "--token-ids", "1,17,200", "--max-new-tokens", "4",
                                 "--cold-mode", "threshold", "--cpu-kernel", "torch", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert len(res["new_ids"]) == 4 and res["weights"] == "q4_g32"
    assert r.exit_code == 0, r.output


def test_cli_compile_q4_prices_quantized_bytes(tmp_path):
    from typer.testing import CliRunner

    from hotcold.cli import app

    r = CliRunner().invoke(app, ["compile", "-m", "random:tiny", "-d", "embedded", "--limit", "4", "--gpu-budget",
                                 "200KB", "--dtype", "q4", "--ctx-len", "64", "-o", str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0, r.output
    b = Bundle.load(tmp_path / "b")
    assert b.dtype == "q4_g32" and 0 < sum(b.n_hot) < 4 * 256  # the budget holds part of the FFN at 4 bits
    assert b.account(64).gpu_total <= 200_000


# ---- from a GGUF: the source's quantized values kept where the layout allows ---------------------
def test_gguf_q4_0_kept_down_requantized(src, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from hotcold.model.registry import load_source
    from tests.gguf_util import write_gguf

    leaves = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "output")
    path = write_gguf(src, tmp_path / "tiny-q4_0.gguf", {k: Q.Q4_0 for k in leaves})
    gsrc = load_source(str(path))
    export_bundle(gsrc, make_placement(gsrc, PLACEMENTS["split"], seed=1), tmp_path / "b",
                  options=ExportOptions(dtype="q4", sparsity=None))
    b = Bundle.load(tmp_path / "b")
    qt = b.manifest["quant"]
    assert qt["source"] == "gguf"
    assert qt["tensors"]["layers.1.wqkv"]["provenance"] == {"wq": "kept", "wk": "kept", "wv": "kept"}
    assert qt["tensors"]["layers.1.cold_up_down"]["provenance"] == {"w_up": "kept", "w_down": "requantized"}
    assert qt["tensors"]["layers.1.hot_down"]["provenance"] == {"w_down": "requantized"}
    assert qt["tensors"]["output"]["provenance"] == {"output": "kept"}
    # kept: bit for bit the GGUF's own dequantized values (Q/K rows unpermuted by a row gather)
    cfg = gsrc.config
    w = dequantize(b.gpu["layers.1.wqkv"])
    q = cfg.n_heads * cfg.head_dim
    assert torch.equal(w[:q], gsrc.get("layers.1.wq"))
    cold = b.cold_index(1).long()
    assert torch.equal(dequantize(b.cpu["layers.1.cold_gate"]), gsrc.get("layers.1.w_gate")[cold])
    # the whole model in exact mode == the GGUF's own dequantized dense model with only what was requantized
    # (the down projection, by neuron) and the embedding (float16) rounded as the bundle stores them
    t = {n: gsrc.get(n) for n in gsrc.names()}
    t["tok_embeddings"] = t["tok_embeddings"].half().float()
    for i in range(cfg.n_layers):
        wd = t[f"layers.{i}.w_down"]
        t[f"layers.{i}.w_down"] = dequantize(quantize(wd.t().contiguous(), 4)).t().contiguous()
    ref = TensorDictSource(cfg, t, "gguf, down requantized")
    m = load(tmp_path / "b", mode="exact", cpu_backend="torch", **FP32_KV)
    x = torch.tensor([IDS])
    assert_as_exact_as_dense(m.forward(x), DenseModel.from_source(ref).forward(x),
                             DenseModel.from_source(ref, dtype=torch.float64).forward(x), "gguf q4_0")


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_qcold_product_rule_against_float64(backend):
    """QColdKernel's product rule (|silu(g)·u| > t decides; added for quantized Bundles) against a float64
    reference over the dequantized rows, for every neuron group and both schedules."""
    if backend == "numba":
        pytest.importorskip("numba")
    from hotcold.quant import hcat
    from hotcold.runtime.qkernels import QColdKernel

    C, D = 300, 64
    gen = torch.Generator().manual_seed(3)
    gate, up, down = (quantize(torch.randn(C, D, generator=gen) * 0.3, 4) for _ in range(3))
    ud = hcat(up, down)
    x = torch.randn(D, generator=gen)
    g64, u64, d64 = (dequantize(t).double() for t in (gate, up, down))
    a = F.silu(g64 @ x.double()) * (u64 @ x.double())
    # t in the widest gap between neighbouring |a| around the median: no neuron on the border in float32
    srt = a.abs().sort().values
    i = C // 3 + int((srt[C // 3 + 1: 2 * C // 3] - srt[C // 3: 2 * C // 3 - 1]).argmax())
    thr = float(srt[i] + srt[i + 1]) / 2
    on = a.abs() > thr
    want = a[on] @ d64[on]
    for group, dyn in ((1, False), (2, True), (4, False), (4, True)):
        k = QColdKernel(D, backend, threads=2, group=group, dynamic=dyn)
        act = torch.zeros(C, dtype=torch.uint8)
        r = k(x, gate, ud, "threshold", rule="product", thr=thr, active=act)
        assert r.n_active == int(on.sum()) and torch.equal(act.bool(), on), (group, dyn)
        assert float((r.y.double() - want).abs().max()) <= 1e-5 * float(want.abs().max()), (group, dyn)
        assert r.bytes_read == C * (gate.row_bytes + ud.row_bytes // 2) + r.n_active * ud.row_bytes // 2


def test_predictor_mode_on_quantized_rows(src):
    """Predictor mode (a selector on the GPU side picks the cold neurons; here the oracle of the gate rule
    over the same dequantized gate rows) decodes exactly as threshold mode with the gate rule."""
    from hotcold.runtime.selectors import OracleSelector

    L = src.config.n_layers
    rng = np.random.default_rng(0)
    hot = [rng.permutation(256)[:k] for k in (0, 64, 200, 30)]
    ts = [0.05] * L
    gates = [dequantize(quantize(src.layer(i)["w_gate"], 4)) for i in range(L)]
    logits = {}
    for mode in ("predictor", "threshold"):
        sel = OracleSelector(gates, ts, "cpu") if mode == "predictor" else None
        m = from_source(src, hot, quant="q4", cold_mode=mode, selector=sel, rule="gate", thresholds=ts, max_len=16,
                        cpu_backend="torch", **FP32_KV)
        m.reset()
        out = []
        for t in IDS[:6]:
            m.step(t)
            out.append(m.logits.clone())
        logits[mode] = torch.stack(out)
        assert 0 < m.report()["decode"]["active_fraction"] < 1
    torch.testing.assert_close(logits["predictor"], logits["threshold"], atol=1e-5, rtol=1e-5)


def test_quantized_model_with_a_tied_float16_head_decodes_on_the_cpu():
    """A tied head stays the float16 embedding while a quantized model computes in float32 (SmolLM2's
    q4 Bundles): step() and forward() give the same logits as the head applied by hand."""
    from hotcold.model.config import shape
    from hotcold.runtime.build import random_quantized_model

    cfg = shape("tiny").replace(tie_embeddings=True, n_layers=2)
    eng = random_quantized_model(cfg, [cfg.n_ff // 2] * 2, "q4", device="cpu", max_len=32)
    assert eng.head.dtype == torch.float16 and eng.dtype == torch.float32
    eng.reset()
    eng.step(3)
    a = eng.logits.clone()
    b = eng.forward(torch.tensor([[3]]))[0, -1]
    assert torch.isfinite(a).all() and a.abs().max() > 0
    torch.testing.assert_close(a, b.float(), atol=2e-2, rtol=2e-2)
