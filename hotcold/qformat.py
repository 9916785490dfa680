"""The quantized formats' names and byte counts (hotcold.quant's QFormat), without torch.

hotcold.memory and the solver price quantized bytes with `QFormat.row_bytes`; they never import torch
(style.md: cheap, layered imports), so the format lives here and hotcold.quant re-exports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hotcold.errors import InputError

BITS = (4, 8)
DEFAULT_GROUP = 32


@dataclass(frozen=True)
class QFormat:
    """bits (4 | 8), group (values per scale, a multiple of 4), asym (a float16 offset per group too)."""

    bits: int = 4
    group: int = DEFAULT_GROUP
    asym: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InputError(f"quantized weights have {self.bits} bits", "use 4 or 8 bits (q4, q8)")
        if self.group < 4 or self.group % 4:
            # INT4 packs a group's two halves into one byte run, and the float16 scales must start at an
            # even byte offset of the row: a multiple of 4 gives both for INT4 and INT8
            raise InputError(f"quantization group {self.group} is not a multiple of 4 (at least 4)",
                             "use a group such as 32 (GGUF's), 64 or 128")

    @property
    def name(self) -> str:
        """Canonical dtype name: q4_g32, q8_g32, q4a_g32 (asymmetric), q4_g128 ..."""
        return f"q{self.bits}{'a' if self.asym else ''}_g{self.group}"

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 * (2 if self.asym else 1) / self.group

    def data_bytes(self, cols: int) -> int:
        return cols * self.bits // 8

    def n_groups(self, cols: int) -> int:
        return cols // self.group

    def check_cols(self, cols: int, what: str = "a row") -> None:
        if cols <= 0 or cols % self.group:
            raise InputError(f"{what} of {cols} values cannot be cut into groups of {self.group} ({self.name})",
                             "choose a group that divides the row length, or a float dtype for this tensor")

    def row_bytes(self, cols: int) -> int:
        """Bytes of one quantized row of `cols` values: data + scales (+ offsets). The one byte count."""
        self.check_cols(cols)
        return self.data_bytes(cols) + 2 * self.n_groups(cols) * (2 if self.asym else 1)

    def tensor_bytes(self, rows: int, cols: int) -> int:
        return rows * self.row_bytes(cols)


_NAME = re.compile(r"^q(4|8)(a?)(?:_?g(\d+))?$")
_GGUF_NAMES = {"q4_0": QFormat(4, 32, False), "q8_0": QFormat(8, 32, False), "q4_1": QFormat(4, 32, True)}


def parse_format(name: str) -> QFormat | None:
    """'q4', 'q8', 'q4a', 'q4_g64', 'q8a_g128', 'q4_0', 'q8_0', 'q4_1' -> QFormat; a float dtype name -> None.

    Anything else that starts with 'q' -> InputError (a typo should not silently mean float)."""
    s = str(name).strip().lower()
    if s in _GGUF_NAMES:
        return _GGUF_NAMES[s]
    m = _NAME.match(s)
    if m:
        return QFormat(int(m.group(1)), int(m.group(3) or DEFAULT_GROUP), bool(m.group(2)))
    if s.startswith("q"):
        raise InputError(f"unknown quantized dtype {name!r}",
                         "use q4 or q8, optionally asymmetric (q4a) and with a group (q4_g64); or q4_0, q8_0, q4_1")
    return None
