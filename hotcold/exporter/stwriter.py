"""A safetensors writer that streams: the header is written from the declared shapes first, then each
tensor's bytes as it is produced, so an exporter holds one layer at a time (a model larger than RAM can
be exported). The sha256 of the file is computed while writing.

The file is byte-compatible with `safetensors` (8-byte header length, JSON header padded with spaces to
a multiple of 8, tensors back to back in declaration order, no holes).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

from hotcold.bundle import ITEMSIZE, ST_DTYPES

TORCH_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.int32: "int32", torch.int64: "int64", torch.bool: "bool", torch.uint8: "uint8"}


class StreamingWriter:
    """Declare every tensor (name, dtype, shape) up front; then `write` them in that order."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs.items())
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, (dtype, shape) in self.specs:
            n = 1
            for s in shape:
                n *= int(s)
            nbytes = n * ITEMSIZE[dtype]
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_bytes = offset
        self.next = 0
        self.sha = hashlib.sha256()
        self.f = open(self.path, "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.sha.update(b)

    def write(self, name: str, t: torch.Tensor | list[torch.Tensor]) -> None:
        """Write the next declared tensor: one tensor, or a list of row blocks stacked along dim 0
        (written one after the other, so they are never concatenated in memory)."""
        if self.next >= len(self.specs):
            raise ValueError(f"{self.path.name}: unexpected tensor {name} (all declared tensors written)")
        want, (dtype, shape) = self.specs[self.next]
        if name != want:
            raise ValueError(f"{self.path.name}: expected tensor {want}, got {name}")
        parts = t if isinstance(t, (list, tuple)) else [t]
        rows = sum(int(p.shape[0]) for p in parts)
        for p in parts:
            if TORCH_NAMES.get(p.dtype) != dtype or (rows, *p.shape[1:]) != tuple(shape):
                raise ValueError(f"{self.path.name}: {name} is {p.dtype} {(rows, *p.shape[1:])}, declared {dtype} {shape}")
        self.next += 1
        for p in parts:
            if p.numel():
                self._put(memoryview(p.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> dict[str, Any]:
        """Finish the file; return its manifest record fields (bytes, sha256, tensors)."""
        if self.next != len(self.specs):
            missing = [n for n, _ in self.specs[self.next:]][:3]
            self.f.close()
            raise ValueError(f"{self.path.name}: tensors never written: {missing}")
        self.f.flush()
        size = self.f.tell()
        self.f.close()
        return {"bytes": size, "sha256": self.sha.hexdigest(),
                "tensors": {n: {"dtype": d, "shape": list(s)} for n, (d, s) in self.specs}}

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
