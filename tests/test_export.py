"""Exporter on the tiny random model: bundle layout (hot-first, row-column bundling, index maps), dtypes,
memory account, streaming, atomicity, thresholds, and refusal of artifacts of another model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hotcold.errors import IncompatibleError, InputError
from hotcold import bundle as fmt
from hotcold.exporter.export import ExportOptions, export_bundle
from hotcold.memory import placement_bytes
from tests.hybrid_util import frequency_order, make_placement, tiny_profile

N_HOT = [0, 64, 200, 256]  # all-CPU, split, split, all-GPU layers


@pytest.fixture(scope="module")
def src():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def profile(src):
    return tiny_profile(src)


@pytest.fixture(scope="module")
def placement(src, profile):
    return make_placement(src, N_HOT, frequency_order(profile))


@pytest.mark.parametrize("rule,layout", [("product", "split"), ("gate", "bundled"), ("product", "bundled")])
def test_layout_hot_first_bundled_rows_and_index_maps(src, profile, placement, tmp_path, rule, layout):
    res = export_bundle(src, placement, tmp_path / "b", profile=profile, options=ExportOptions(rule=rule, cpu_layout=layout))
    m = res.manifest
    assert m["kind"] == "bundle" and m["format_version"] == fmt.FORMAT_VERSION and m["cpu_layout"] == layout
    listed = {f["path"] for f in m["files"]}
    assert {fmt.GPU_FILE, fmt.CPU_FILE, fmt.NEURONS_FILE} <= listed
    assert m["tokenizer"] is None  # the random model has none
    assert m["placement"]["n_hot"] == N_HOT and m["model"]["fingerprint"] == src.fingerprint

    # files are plain safetensors (the reference reader agrees with our memory-mapped one)
    from safetensors.torch import load_file

    gpu, cpu, idx = (load_file(str(tmp_path / "b" / f)) for f in (fmt.GPU_FILE, fmt.CPU_FILE, fmt.NEURONS_FILE))
    mm = fmt.mmap_tensors(tmp_path / "b" / fmt.GPU_FILE)
    assert set(mm) == set(gpu) and all(torch.equal(mm[k], gpu[k]) for k in gpu)

    D = src.config.dim
    for i, k in enumerate(N_HOT):
        t = src.layer(i)
        order = torch.from_numpy(placement.order[i].astype(np.int64))
        hot, cold = order[:k], order[k:]
        assert torch.equal(idx[f"layers.{i}.hot"], hot.int()) and torch.equal(idx[f"layers.{i}.cold"], cold.int())
        assert torch.equal(gpu[f"layers.{i}.hot_gate_up"], torch.cat([t["w_gate"][hot], t["w_up"][hot]]))
        assert torch.equal(gpu[f"layers.{i}.hot_down"], t["w_down"][:, hot].t())  # a neuron's down = one row
        assert torch.equal(gpu[f"layers.{i}.wqkv"], torch.cat([t["wq"], t["wk"], t["wv"]]))
        if layout == "bundled":
            assert torch.equal(cpu[f"layers.{i}.cold_gate"], t["w_gate"][cold])
            ud = cpu[f"layers.{i}.cold_up_down"]  # row j = [up_j | down_j]: one contiguous block per neuron
            assert ud.shape == (len(cold), 2 * D)
            assert torch.equal(ud[:, :D], t["w_up"][cold]) and torch.equal(ud[:, D:], t["w_down"][:, cold].t())
        else:
            gu_t = cpu[f"layers.{i}.cold_gate_up_t"]  # [D, 2c]: the gate/up rows stored column by column
            assert gu_t.shape == (D, 2 * len(cold))
            assert torch.equal(gu_t.t(), torch.cat([t["w_gate"][cold], t["w_up"][cold]]))
            assert torch.equal(cpu[f"layers.{i}.cold_down"], t["w_down"][:, cold].t())
    # hot neurons are the placement's hottest: frequency non-increasing along hot then cold
    f = profile.frequencies()
    for i in range(src.config.n_layers):
        fo = f[i][placement.order[i]]
        assert np.all(np.diff(fo) <= 1e-12)


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_dtypes_and_memory_account(src, placement, tmp_path, dtype, itemsize):
    res = export_bundle(src, placement, tmp_path / dtype, options=ExportOptions(dtype=dtype, sparsity=None))
    m = res.manifest
    acct = placement_bytes(src.config, N_HOT, dtype, ctx_len=m["ctx_len"], cold_mode="threshold")
    assert m["memory"]["gpu"] == acct.gpu and m["memory"]["cpu"] == acct.cpu
    cfg = src.config
    rec = {f["path"]: f for f in m["files"]}
    assert rec[fmt.CPU_FILE]["dtype"] == dtype
    cold_bytes = sum((cfg.n_ff - k) * 3 * cfg.dim * itemsize for k in N_HOT)
    assert acct.cpu["ffn_cold"] == cold_bytes
    t = fmt.mmap_tensors(tmp_path / dtype / fmt.CPU_FILE)
    assert all(str(v.dtype) == f"torch.{dtype}" for v in t.values())
    assert sum(v.numel() * v.element_size() for v in t.values()) == cold_bytes


class CountingSource:
    """Wraps a WeightSource and records which layers are read, in order."""

    def __init__(self, src, fail_at: int | None = None):
        self.src, self.fail_at, self.calls = src, fail_at, []
        self.config, self.description, self.fingerprint = src.config, src.description, src.fingerprint

    def layer(self, i, dtype=torch.float32):
        self.calls.append(i)
        if i == self.fail_at:
            raise RuntimeError("disk on fire")
        return self.src.layer(i, dtype)

    def __getattr__(self, name):
        return getattr(self.src, name)


def test_streams_one_layer_at_a_time(src, placement, tmp_path):
    cs = CountingSource(src)
    export_bundle(cs, placement, tmp_path / "b", options=ExportOptions(sparsity=None))
    assert cs.calls == list(range(src.config.n_layers))


def test_failure_leaves_nothing_half_written(src, placement, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_bundle(CountingSource(src, fail_at=2), placement, out, options=ExportOptions(sparsity=None))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # and a previous bundle survives a failed re-export
    export_bundle(src, placement, out, options=ExportOptions(sparsity=None))
    before = (out / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        export_bundle(CountingSource(src, fail_at=1), placement, out, options=ExportOptions(sparsity=None))
    assert (out / "manifest.json").read_text() == before


def test_thresholds(src, profile, placement, tmp_path):
    from hotcold.exporter.thresholds import magnitudes

    m = export_bundle(src, placement, tmp_path / "p", profile=profile, options=ExportOptions(sparsity=0.5)).manifest
    assert m["activation"]["rule"] == "product" and m["activation"]["source"] == "profile histograms"
    assert m["activation"]["thresholds"] == pytest.approx(profile.magnitude_thresholds(0.5, "decode"))

    m = export_bundle(src, placement, tmp_path / "g", profile=profile,
                      options=ExportOptions(rule="gate", sparsity=0.3)).manifest
    x = torch.from_numpy(profile.samples["x"][:, 1]).float()
    v = magnitudes("gate", "silu", x, src.layer(1)["w_gate"])
    assert (v > m["activation"]["thresholds"][1]).float().mean().item() == pytest.approx(0.7, abs=0.01)

    m = export_bundle(src, placement, tmp_path / "t", options=ExportOptions(threshold=0.25)).manifest
    assert m["activation"]["thresholds"] == [0.25] * 4 and m["activation"]["source"] == "given"
    assert export_bundle(src, placement, tmp_path / "n", options=ExportOptions()).manifest["activation"] is None


def test_refuses_artifacts_of_another_model(src, profile, placement, tmp_path):
    from hotcold.model.registry import load_source

    other = load_source("random:tiny:seed=1")
    with pytest.raises(IncompatibleError, match="fingerprint"):
        export_bundle(other, placement, tmp_path / "b")
    with pytest.raises(IncompatibleError, match="profile"):
        export_bundle(other, make_placement(other, 8), tmp_path / "b", profile=profile)
    smaller = load_source("random:tiny:n_layers=2")
    with pytest.raises(IncompatibleError, match="shape"):
        export_bundle(smaller, placement, tmp_path / "b")
    bad = make_placement(src, 8, order=np.zeros((4, 256), np.int32))
    with pytest.raises(IncompatibleError, match="permutation"):
        export_bundle(src, bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_gate_rule_needs_samples(src, profile, placement, tmp_path):
    import dataclasses

    bare = dataclasses.replace(profile, samples={})
    with pytest.raises(InputError, match="--samples"):
        export_bundle(src, placement, tmp_path / "b", profile=bare, options=ExportOptions(rule="gate"))
    # the product rule needs only the histograms
    export_bundle(src, placement, tmp_path / "b", profile=bare, options=ExportOptions(rule="product"))


def test_manifest_is_sealed(src, placement, tmp_path):
    m = export_bundle(src, placement, tmp_path / "b").manifest
    on_disk = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert on_disk == m and on_disk["manifest_sha256"] == fmt.manifest_digest(on_disk)
