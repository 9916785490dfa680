"""What every stage artifact shares: atomic directory writes, sha256 file records, manifest checks.

A stage boundary is a directory with a versioned `manifest.json` listing every file it holds
(relative path, sha256, dtype, shape) and the hashes of the inputs it was made from (style.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hotcold import __version__
from hotcold.errors import IncompatibleError, InputError

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it into place only if the block succeeds.

    An interrupted or failed run leaves `final` as it was (absent, or the previous version).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a directory", "choose another --out path")
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists", "remove it or choose another --out path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result gets a normal directory's mode
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_record(root: Path, rel: str, **extra: Any) -> dict[str, Any]:
    """Manifest entry for one file: relative path, size, sha256 and any extra fields (dtype, shape)."""
    p = root / rel
    return {"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p), **extra}


def write_manifest(root: Path, kind: str, format_version: int, body: dict[str, Any]) -> dict[str, Any]:
    manifest = {"kind": kind, "format_version": format_version, "producer": f"hotcold {__version__}", **body}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(root: str | os.PathLike, kind: str, supported_versions: tuple[int, ...]) -> dict[str, Any]:
    """Read and check a manifest: it exists, parses, is of `kind`, and of a version we can read."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist", f"pass the directory a `hotcold` command wrote as a {kind}")
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{root} has no {MANIFEST}, so it is not a hotcold {kind}",
                         f"pass the directory a `hotcold` command wrote as a {kind}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleError(f"{path} is not valid JSON ({e})", f"re-create the {kind}") from None
    if manifest.get("kind") != kind:
        raise IncompatibleError(f"{root} is a {manifest.get('kind', 'unknown artifact')}, not a {kind}",
                                f"pass a {kind} directory here")
    version = manifest.get("format_version")
    if version not in supported_versions:
        raise IncompatibleError(
            f"{root} is {kind} format version {version}; this hotcold reads {list(supported_versions)}",
            f"re-create it with this version of hotcold ({__version__})")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any], kind: str) -> None:
    """Check every file the manifest lists exists with the recorded sha256."""
    for rec in manifest.get("files", []):
        p = root / rec["path"]
        if not p.is_file():
            raise IncompatibleError(f"{kind} {root} is missing {rec['path']}", f"re-create the {kind}")
        if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            raise IncompatibleError(f"{kind} {root}: {rec['path']} was altered (sha256 mismatch)",
                                    f"re-create the {kind}")


class ModelArtifact:
    """What every artifact made for one model shares: its manifest's `model` record and a content hash
    (the manifest minus file records, plus the files' hashes). Profile and Placement mix it in."""

    manifest: dict[str, Any]

    @property
    def model_config(self):  # -> hotcold.model.config.ModelConfig (imported late: artifacts is below model)
        from hotcold.model.config import ModelConfig

        return ModelConfig.from_json(self.manifest["model"]["config"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def content_hash(self) -> str:
        return sha256_json({k: v for k, v in self.manifest.items() if k != "files"} |
                           {"files": [f["sha256"] for f in self.manifest.get("files", [])]})
