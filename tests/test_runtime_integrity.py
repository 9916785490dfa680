"""A Bundle with a flipped byte in any file, a deleted file, files of two bundles mixed, a bundle of another
model, or an unknown format version is refused with one clear message naming the file (library and CLI)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.errors import IncompatibleError, InputError
from hotcold import bundle as fmt
from hotcold.exporter.export import ExportOptions, export_bundle
from hotcold.bundle import Bundle
from tests.hybrid_util import make_placement, tiny_profile


@pytest.fixture(scope="module")
def src():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def bundle(src, tmp_path_factory):
    """A bundle with every kind of file: weights, index maps, and predictors."""
    from hotcold.exporter.predictors import PredictorOptions

    p = tmp_path_factory.mktemp("integrity") / "b"
    prof = tiny_profile(src, samples=256, limit=3)
    export_bundle(src, make_placement(src, [0, 64, 200, 256]), p, profile=prof,
                  options=ExportOptions(predictors=True, predictor=PredictorOptions(epochs=2, ranks=(16,))))
    return p


def _files(bundle):
    return [rec["path"] for rec in json.loads((bundle / "manifest.json").read_text())["files"]] + ["manifest.json"]


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_loads(bundle):
    b = Bundle.load(bundle)
    assert b.n_hot == [0, 64, 200, 256] and b.predictors
    assert {fmt.GPU_FILE, fmt.CPU_FILE, fmt.NEURONS_FILE, fmt.predictor_file(3)} <= set(_files(bundle))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_byte_in_any_file_is_named(bundle, tmp_path, where):
    for rel in _files(bundle):
        b = _copy(bundle, tmp_path)
        p = b / rel
        data = bytearray(p.read_bytes())
        i = {"start": 0, "middle": len(data) // 2, "end": len(data) - 2}[where]
        data[i] ^= 0xFF
        p.write_bytes(bytes(data))
        with pytest.raises((IncompatibleError, InputError)) as e:
            Bundle.load(b)
        assert rel in str(e.value), (rel, str(e.value))
        shutil.rmtree(b)


def test_deleted_file_is_named(bundle, tmp_path):
    for rel in _files(bundle):
        b = _copy(bundle, tmp_path)
        (b / rel).unlink()
        with pytest.raises((IncompatibleError, InputError)) as e:
            Bundle.load(b)
        assert rel in str(e.value), (rel, str(e.value))
        shutil.rmtree(b)


def test_files_of_two_bundles_mixed(src, bundle, tmp_path):
    from hotcold.model.registry import load_source

    other = load_source("random:tiny:seed=7")
    o = tmp_path / "other"
    export_bundle(other, make_placement(other, [0, 64, 200, 256]), o)
    b = _copy(bundle, tmp_path)
    shutil.copy(o / fmt.CPU_FILE, b / fmt.CPU_FILE)
    with pytest.raises(IncompatibleError, match=fmt.CPU_FILE):
        Bundle.load(b)
    # even with the manifest's hashes "fixed" up, the file says which model it belongs to
    m = json.loads((b / "manifest.json").read_text())
    for rec in m["files"]:
        if rec["path"] == fmt.CPU_FILE:
            rec.update(json.loads(json.dumps({k: v for k, v in json.loads((o / "manifest.json").read_text())["files"][1].items()
                                              if k in ("bytes", "sha256")})))
    fmt.seal_manifest(b, m)
    with pytest.raises(IncompatibleError, match=f"{fmt.CPU_FILE} was written for model fingerprint"):
        Bundle.load(b)


def test_bundle_of_another_model(src, bundle):
    from hotcold.model.registry import load_source

    Bundle.load(bundle, expect_fingerprint=src.fingerprint)
    other = load_source("random:tiny:seed=7").fingerprint
    with pytest.raises(IncompatibleError, match="manifest.json.*was exported from random:tiny"):
        Bundle.load(bundle, expect_fingerprint=other)


def test_unknown_version_and_not_a_bundle(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    fmt.seal_manifest(b, m)
    with pytest.raises(IncompatibleError, match="format version 99"):
        Bundle.load(b)
    with pytest.raises(InputError, match="no manifest.json"):
        Bundle.load(tmp_path)


def test_cli_refuses_altered_bundle(bundle, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["run", str(bundle), "--token-ids", "1,2,3", "-n", "3", "--cold-mode", "exact", "--json"])
    assert ok.exit_code == 0, ok.output
    b = _copy(bundle, tmp_path)
    data = bytearray((b / fmt.GPU_FILE).read_bytes())
    data[len(data) // 3] ^= 0x01
    (b / fmt.GPU_FILE).write_bytes(bytes(data))
    r = runner.invoke(app, ["run", str(b), "--token-ids", "1,2,3", "-n", "3"])
    assert r.exit_code == IncompatibleError.exit_code
    assert f"{fmt.GPU_FILE} was altered" in r.output and "Traceback" not in r.output
    shutil.copy(bundle / fmt.GPU_FILE, b / fmt.GPU_FILE)
    (b / fmt.NEURONS_FILE).unlink()
    r = runner.invoke(app, ["run", str(b), "--token-ids", "1,2,3"])
    assert r.exit_code != 0 and f"missing {fmt.NEURONS_FILE}" in r.output
    r = runner.invoke(app, ["run", str(bundle), "--token-ids", "1,2", "--model", "random:tiny:seed=3"])
    assert r.exit_code == IncompatibleError.exit_code and "was exported from" in r.output
