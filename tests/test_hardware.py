"""HardwareSpec: presets, JSON round trip, bad files, and a real (short) calibration of this machine."""

from __future__ import annotations

import json

import pytest

from hotcold.errors import IncompatibleError, InputError
from hotcold.solver.hardware import PRESETS, HardwareSpec, calibrate, preset, resolve


def test_presets_carry_the_documented_numbers():
    h = preset("h200")
    assert (h.gpu.bandwidth, h.cpu.bandwidth, h.link.pcie_bandwidth, h.link.sync_seconds) == (4.3e12, 97e9, 55.2e9, 15.7e-6)
    assert preset("PC-High").gpu.memory_bytes == 24 * 2**30 and preset("pc-high").cpu.bandwidth == 67.2e9
    assert preset("pc-low").gpu.memory_bytes == 11 * 2**30 and preset("pc-low").cpu.bandwidth == 38.4e9
    for spec in PRESETS.values():
        assert spec.source and spec.notes  # every number says where it comes from
        assert 0 < spec.default_gpu_budget < spec.gpu.memory_bytes


def test_h200_decode_preset_and_host_overhead():
    d = preset("h200-decode")
    assert (d.gpu.bandwidth, d.cpu.bandwidth, d.link.sync_seconds) == (3.26e12, 76e9, 15.7e-6)
    assert d.link.host_overhead_seconds == pytest.approx(274e-6)
    # sync + host = the 290 µs per split layer that the H200 bench fitted (run 2)
    assert d.link.sync_seconds + d.link.host_overhead_seconds == pytest.approx(289.7e-6, rel=1e-3)
    assert "link.host_overhead_seconds" in d.notes
    # the raw preset keeps the device rates and no engine overhead
    assert preset("h200").link.host_overhead_seconds == 0.0
    assert (d.gpu.memory_bytes, d.cpu.memory_bytes) == (preset("h200").gpu.memory_bytes, preset("h200").cpu.memory_bytes)


def test_version_1_specs_still_load(tmp_path):
    """Format version 1 had no link.host_overhead_seconds: such files load, with 0."""
    d = preset("h200").to_json()
    d["format_version"] = 1
    del d["link"]["host_overhead_seconds"]
    (tmp_path / "v1.json").write_text(json.dumps(d))
    old = HardwareSpec.load(tmp_path / "v1.json")
    assert old.link.host_overhead_seconds == 0.0 and old.link.sync_seconds == 15.7e-6
    assert old.to_json()["format_version"] == 2
    from pathlib import Path

    fitted = Path(__file__).resolve().parents[1] / "bench" / "results" / "hw_h200_fitted_run2.json"
    assert HardwareSpec.load(fitted).link.host_overhead_seconds == 0.0  # a real version-1 file
    d = preset("h200-decode").to_json()
    d["link"]["host_overhead_seconds"] = -1e-6
    (tmp_path / "neg.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="host_overhead_seconds must be 0 or more"):
        HardwareSpec.load(tmp_path / "neg.json")


def test_round_trip(tmp_path):
    for name, spec in PRESETS.items():
        path = spec.save(tmp_path / f"{name}.json")
        assert HardwareSpec.load(path) == spec
        assert resolve(path=path) == spec


def test_bad_specs(tmp_path):
    with pytest.raises(InputError, match="unknown hardware preset"):
        preset("cray-1")
    with pytest.raises(InputError, match="does not exist"):
        HardwareSpec.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        HardwareSpec.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "placement"}))
    with pytest.raises(IncompatibleError, match="not a hardware spec"):
        HardwareSpec.load(tmp_path / "other.json")
    d = preset("h200").to_json()
    d["format_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(d))
    with pytest.raises(IncompatibleError, match="version 99"):
        HardwareSpec.load(tmp_path / "v99.json")
    d = preset("h200").to_json()
    d["cpu"]["bandwidth"] = 0
    (tmp_path / "zero.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="cpu.bandwidth must be positive"):
        HardwareSpec.load(tmp_path / "zero.json")
    del d["gpu"]
    (tmp_path / "nogpu.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="missing"):
        HardwareSpec.load(tmp_path / "nogpu.json")
    with pytest.raises(InputError, match="both"):
        resolve("h200", tmp_path / "x.json")
    with pytest.raises(InputError, match="no hardware"):
        resolve()


def test_calibrate_this_machine_quickly():
    pytest.importorskip("torch", reason="calibrate measures with torch, which is not installed")
    spec = calibrate(seconds=3.0)
    assert spec.cpu.bandwidth > 1e8 and spec.cpu.memory_bytes > 2**30
    assert spec.measurements["cpu_read_GBps"] > 0 and spec.measurements["seconds"] < 30
    import torch

    if not torch.cuda.is_available():
        assert spec.link.shared_memory and spec.link.sync_seconds == 0
        assert spec.gpu.bandwidth == spec.cpu.bandwidth
    assert HardwareSpec.from_json(spec.to_json()) == spec
