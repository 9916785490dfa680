"""Predictors: trained on the profile's samples, sized per layer, exported to ONNX (checker + onnxruntime ==
torch within 1e-5, dynamic batch), recall/precision reported on held-out data; runtime predictor mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hotcold import bundle as fmt
from hotcold.exporter.export import ExportOptions, export_bundle
from hotcold.exporter.predictors import PredictorOptions, export_layer_predictor, forward_arrays
from hotcold.runtime import load
from hotcold.runtime.predictor import read_weights
from tests.hybrid_util import frequency_order, make_placement, smollm_profile, tiny_profile


@pytest.fixture(scope="module")
def src():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def bundle(src, tmp_path_factory):
    prof = tiny_profile(src, samples=768, limit=6)
    held = tiny_profile(src, samples=256, limit=3, split="test")  # other prompts
    p = tmp_path_factory.mktemp("pred") / "b"
    res = export_bundle(src, make_placement(src, [0, 64, 200, 256], frequency_order(prof)), p, profile=prof,
                        heldout=held, options=ExportOptions(predictors=True,
                                                            predictor=PredictorOptions(epochs=8, ranks=(8, 16, 32))))
    return p, res


def test_onnx_files_check_and_equal_torch(bundle):
    import onnx
    import onnxruntime as ort

    p, res = bundle
    rep = res.manifest["predictors"]["report"]
    assert len(rep) == 4
    for i, r in enumerate(rep):
        path = p / fmt.predictor_file(i)
        onnx.checker.check_model(str(path), full_check=True)
        w = read_weights(path)
        assert w["w1"].shape == (r["rank"], 64) and w["w2"].shape == (256, r["rank"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 7):  # dynamic batch
            x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
            (got,) = sess.run(["logits"], {"x": x.numpy()})
            want = forward_arrays(w, x).numpy()
            assert np.abs(got - want).max() <= 1e-5
        assert r["onnx_check"]["ok"] and r["onnx_check"]["max_abs_diff"] <= 1e-5
        assert r["rank"] in (8, 16, 32) and [t["rank"] for t in r["tried"]][0] == 8
        h = r["heldout"]
        assert {"recall", "precision", "selected_fraction", "active_fraction"} <= set(h)
        assert "held-out profile" in r["heldout_source"]
        assert 0.0 <= h["precision"] <= 1.0 and h["recall"] > 0.5
        assert math.isfinite(r["decision_threshold"])


def test_runtime_predictor_mode(bundle):
    p, _ = bundle
    ids = torch.tensor([[1, 17, 200, 33, 4, 99, 123, 7]])
    a = load(p, mode="predictor", prefill="sparse", predictor_backend="torch")
    b = load(p, mode="predictor", prefill="sparse", predictor_backend="onnxruntime")
    torch.testing.assert_close(a.forward(ids), b.forward(ids), atol=1e-5, rtol=1e-5)
    rep = a.report()["prefill"]["layers"][0]
    assert rep["predicted_per_forward"] > 0
    # the predicted neurons are computed exactly: a predictor that selects every neuron gives exact mode
    a.selector.decision.fill_(-math.inf)
    ex = load(p, mode="exact")
    torch.testing.assert_close(a.forward(ids), ex.forward(ids), atol=1e-5, rtol=1e-5)
    g = a.generate([1, 17, 200], 5)
    assert len(g.new_ids) == 5 and a.report()["decode"]["tokens"] == 4


@pytest.mark.smollm
@pytest.mark.slow
def test_smollm_predictors_recall_on_heldout_prompts(smollm_source, tmp_path):
    """Three layers of SmolLM2 (first, middle, last), trained on MBPP train prompts, measured on validation
    prompts; the same code path `hotcold export --predictors` runs for every layer."""
    src = smollm_source
    cfg = src.config
    prof = smollm_profile(src, "train", 24, 2048)
    held = smollm_profile(src, "validation", 8, 1024)
    thresholds = prof.magnitude_thresholds(0.5, "decode")
    opts = PredictorOptions()
    for layer in (0, cfg.n_layers // 2, cfg.n_layers - 1):
        t = src.layer(layer)
        perm = torch.randperm(cfg.n_ff, generator=torch.Generator().manual_seed(layer))
        r = export_layer_predictor(layer, cfg, t["w_gate"], t["w_up"], perm, "product", thresholds[layer], prof,
                                   held, opts, tmp_path / f"layer_{layer}.onnx")
        h = r["heldout"]
        print(f"layer {layer}: rank {r['rank']} (tried {[x['rank'] for x in r['tried']]}), held-out recall "
              f"{h['recall']:.3f} precision {h['precision']:.3f} selected {h['selected_fraction']:.3f} "
              f"(active {h['active_fraction']:.3f}), onnx |Δ| {r['onnx_check']['max_abs_diff']:.2g}")
        assert r["onnx_check"]["max_abs_diff"] <= 1e-5 + 1e-5 * r["onnx_check"]["max_abs_logit"]
        assert h["recall"] >= 0.9
