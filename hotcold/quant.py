"""Group-wise INT4 / INT8 weights: one byte format for the GPU side, the CPU side and the Bundle.

A quantized [rows, cols] matrix is cut into groups of `group` consecutive values along each row (the
input dimension of a linear layer; 32 by default). Each group has one float16 scale `d` and, for the
asymmetric variant only, one float16 offset `m`:

    symmetric INT4    w = d · (q − 8),   q ∈ 0..15   (GGUF Q4_0's rule and bytes, at group 32)
    symmetric INT8    w = d · q,         q ∈ −127..127 stored as int8   (GGUF Q8_0)
    asymmetric INT4   w = d · q + m,     q ∈ 0..15   (GGUF Q4_1)
    asymmetric INT8   w = d · q + m,     q ∈ 0..255

Symmetric is the default: it costs one scale per group (4.5 / 8.5 bits per weight at group 32, exactly
Q4_0 / Q8_0's bytes, so a model's memory matches what llama.cpp holds), and the kernels do one multiply
per group. Asymmetric exists so that Q4_1 files (SmolLM2's GGUF is one) keep their values exactly
instead of being quantized a second time; it costs 2 more bytes per group (5 bits per weight at INT4).

Byte layout, one contiguous range per row (a neuron's row moves between GPU and CPU as one byte copy):

    row j = [ data: cols·bits/8 bytes | scales: cols/group float16 | offsets: cols/group float16 (asym) ]

INT4 data: within a group of g values, byte i (0 ≤ i < g/2) holds value i in its low nibble and value
i + g/2 in its high nibble. At g = 32 this is Q4_0's own order, so a Q4_0 block's 16 bytes are copied
unchanged; it also lets a kernel unpack a byte run into two runs of consecutive values (no shuffles).
INT8 data: one byte per value, in order (two's complement when symmetric).

`QTensor.packed` (uint8 [rows, row_bytes]) is the whole tensor; `data`, `scales`, `offsets` are views
into it. `row_bytes` / `QFormat.row_bytes` is the one byte count (data + scales) that the memory
account and the solver use. Quantizing follows llama.cpp's reference rounding bit for bit at group 32
(Q4_0, Q4_1, Q8_0), and dequantizing reproduces `gguf.quants.dequantize` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hotcold.errors import InputError
# the format itself (names, bytes) is torch-free, so the memory account and the solver can use it
from hotcold.qformat import BITS, DEFAULT_GROUP, QFormat, parse_format

# values per chunk while (de)quantizing: temporaries stay ~100 MB however large the matrix is
_CHUNK_VALUES = 1 << 22

# how a tensor got into the format (recorded per tensor in a Bundle's manifest)
KEPT = "kept"  # the source's quantized values carried over exactly (bytes rearranged, nothing rounded)
QUANTIZED = "quantized"  # quantized from float weights (F32 / F16 / BF16 source)
REQUANTIZED = "requantized"  # dequantized from another quantized type, then quantized (lossy twice)
PROVENANCES = (KEPT, QUANTIZED, REQUANTIZED)


def row_bytes(cols: int, bits: int, group: int = DEFAULT_GROUP, asym: bool = False) -> int:
    """Bytes of one quantized row of `cols` values (data + float16 scales, + offsets when asym)."""
    return QFormat(bits, group, asym).row_bytes(cols)


def neuron_bytes(dim: int, fmt: QFormat) -> int:
    """One FFN neuron in this format: its gate row, up row and down column, `dim` values each."""
    return 3 * fmt.row_bytes(dim)


# ---- the tensor --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized [rows, cols] matrix. `packed`: uint8 [rows, fmt.row_bytes(cols)], on any device."""

    packed: torch.Tensor
    fmt: QFormat
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.shape
        want = (rows, self.fmt.row_bytes(cols))
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != want:
            raise InputError(f"quantized tensor bytes are {self.packed.dtype} {list(self.packed.shape)}, "
                             f"expected uint8 {list(want)} for {self.fmt.name} of shape {list(self.shape)}",
                             "the Bundle's file and its manifest disagree: export it again")

    # what the format's fields are
    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def group(self) -> int:
        return self.fmt.group

    @property
    def asym(self) -> bool:
        return self.fmt.asym

    @property
    def row_bytes(self) -> int:
        return int(self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    @property
    def device(self) -> torch.device:
        return self.packed.device

    # views into `packed`
    @property
    def data(self) -> torch.Tensor:
        """uint8 [rows, cols·bits/8] (INT8 symmetric: reinterpret with .view(torch.int8))."""
        return self.packed[:, : self.fmt.data_bytes(self.shape[1])]

    @property
    def scales(self) -> torch.Tensor:
        """float16 [rows, cols/group]."""
        nd, ng = self.fmt.data_bytes(self.shape[1]), self.fmt.n_groups(self.shape[1])
        return _f16(self.packed[:, nd: nd + 2 * ng])

    @property
    def offsets(self) -> torch.Tensor | None:
        """float16 [rows, cols/group] (asymmetric formats), else None."""
        if not self.asym:
            return None
        nd, ng = self.fmt.data_bytes(self.shape[1]), self.fmt.n_groups(self.shape[1])
        return _f16(self.packed[:, nd + 2 * ng: nd + 4 * ng])

    # rows: a neuron's row is one byte range of `packed`
    def row_range(self, j: int) -> tuple[int, int]:
        """Byte range [lo, hi) of row j in the row-major bytes of `packed`."""
        return j * self.row_bytes, (j + 1) * self.row_bytes

    def rows(self, start: int, stop: int) -> QTensor:
        """Rows start..stop as a view (no copy)."""
        p = self.packed[start:stop]
        return QTensor(p, self.fmt, (int(p.shape[0]), self.shape[1]))

    def take_rows(self, idx: torch.Tensor | np.ndarray | list[int]) -> QTensor:
        """Rows idx (a copy): hot-first permutation, hot/cold split, GGUF's Q/K row unpermutation."""
        i = idx.to(device=self.device, dtype=torch.int64) if isinstance(idx, torch.Tensor) else \
            torch.as_tensor(np.asarray(idx), dtype=torch.int64, device=self.device)
        return QTensor(self.packed.index_select(0, i), self.fmt, (int(i.numel()), self.shape[1]))

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.packed.to(device), self.fmt, self.shape)

    def contiguous(self) -> QTensor:
        return QTensor(self.packed.contiguous(), self.fmt, self.shape)

    # a Bundle stores `packed` as one U8 tensor and this beside it in the manifest
    def meta(self) -> dict[str, Any]:
        return {"format": self.fmt.name, "bits": self.bits, "group": self.group, "asym": self.asym,
                "shape": list(self.shape)}

    @classmethod
    def from_packed(cls, packed: torch.Tensor, meta: dict[str, Any]) -> QTensor:
        try:
            fmt = QFormat(int(meta["bits"]), int(meta["group"]), bool(meta.get("asym", False)))
            shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(f"quantized tensor metadata {meta!r} is incomplete",
                             "the Bundle's manifest is damaged: export it again") from None
        return cls(packed, fmt, shape)

    @classmethod
    def from_parts(cls, data: torch.Tensor, scales: torch.Tensor, fmt: QFormat, shape: tuple[int, int],
                   offsets: torch.Tensor | None = None) -> QTensor:
        """Assemble from data uint8 [rows, cols·bits/8], scales float16 [rows, ng] (offsets when asym)."""
        parts = [data.to(torch.uint8), scales.to(torch.float16).contiguous().view(torch.uint8)]
        if fmt.asym:
            if offsets is None:
                raise ValueError("an asymmetric format needs offsets")
            parts.append(offsets.to(torch.float16).contiguous().view(torch.uint8))
        return cls(torch.cat(parts, dim=1).contiguous(), fmt, (int(shape[0]), int(shape[1])))


def _f16(b: torch.Tensor) -> torch.Tensor:
    """A uint8 [r, 2n] view (unit stride along the row, even row stride and offset) as float16 [r, n]."""
    if b.shape[0] == 0:
        return torch.empty(0, b.shape[1] // 2, dtype=torch.float16, device=b.device)
    return b.view(torch.float16)


def hcat(a: QTensor, b: QTensor) -> QTensor:
    """[rows, ca] | [rows, cb] -> [rows, ca + cb], exact (the bytes rearranged): a cold neuron's up row
    and down column become one up_down row."""
    if a.fmt != b.fmt or a.shape[0] != b.shape[0]:
        raise ValueError(f"hcat needs the same format and row count, got {a.fmt.name} {a.shape} and "
                         f"{b.fmt.name} {b.shape}")
    offs = (torch.cat([a.offsets, b.offsets], 1) if a.asym else None)
    return QTensor.from_parts(torch.cat([a.data, b.data], 1), torch.cat([a.scales, b.scales], 1), a.fmt,
                              (a.shape[0], a.shape[1] + b.shape[1]), offs)


# ---- quantize / dequantize ---------------------------------------------------------------------
def _check_matrix(w: Any, fmt: QFormat, name: str) -> torch.Tensor:
    t = torch.as_tensor(w) if not isinstance(w, torch.Tensor) else w
    where = f"tensor {name}" if name else "the tensor"
    if t.dim() != 2:
        raise InputError(f"{where} has shape {list(t.shape)}; only matrices [rows, cols] are quantized",
                         "reshape it to 2-D first, or keep it in a float dtype")
    if not (t.is_floating_point()):
        raise InputError(f"{where} is {t.dtype}, not a float tensor", "quantize float weights")
    fmt.check_cols(int(t.shape[1]), f"a row of {where}")
    return t


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), as gguf's np_roundf computes it (bit-exact with ggml's Q8_0)."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def _quantize_chunk(w: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    r, cols = w.shape
    g, ng = fmt.group, cols // fmt.group
    b = w.reshape(r, ng, g)
    zero = torch.zeros((), dtype=torch.float32, device=w.device)
    m = None
    if fmt.asym:
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (hi - lo) / (15 if fmt.bits == 4 else 255)
        inv = torch.where(d == 0, zero, 1 / d)
        q = torch.trunc((b - lo) * inv + 0.5).clamp(0, 15 if fmt.bits == 4 else 255).to(torch.uint8)
        m = lo
    elif fmt.bits == 4:
        # Q4_0: the value of largest magnitude maps to -8 exactly, so all 16 levels are used (amax/7 would
        # leave -8 unused and make the step 8/7 coarser)
        mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))
        d = mx / -8
        inv = torch.where(d == 0, zero, 1 / d)
        q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)
    else:
        d = b.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, zero, 1 / d)
        q = _roundf(b * inv).to(torch.int8).view(torch.uint8)
    if fmt.bits == 4:
        data = (q[..., : g // 2] | (q[..., g // 2:] << 4)).reshape(r, cols // 2)
    else:
        data = q.reshape(r, cols)
    parts = [data, d.reshape(r, ng).to(torch.float16).view(torch.uint8)]
    if m is not None:
        parts.append(m.reshape(r, ng).to(torch.float16).view(torch.uint8))
    return torch.cat(parts, dim=1)


def quantize(w: torch.Tensor | np.ndarray, bits: int = 4, group: int = DEFAULT_GROUP, asym: bool = False, *,
             name: str = "") -> QTensor:
    """Quantize a float matrix [rows, cols] group-wise along its rows (on w's device)."""
    fmt = QFormat(bits, group, asym)
    t = _check_matrix(w, fmt, name)
    rows, cols = int(t.shape[0]), int(t.shape[1])
    out = torch.empty(rows, fmt.row_bytes(cols), dtype=torch.uint8, device=t.device)
    step = max(1, _CHUNK_VALUES // cols)
    for r0 in range(0, rows, step):
        c = t[r0: r0 + step].to(torch.float32)
        if not bool(torch.isfinite(c).all()):
            raise InputError(f"tensor {name or '(unnamed)'} has NaN or infinite values "
                             f"(rows {r0}..{r0 + c.shape[0] - 1})",
                             "the source weights are damaged: fetch the model again")
        out[r0: r0 + step] = _quantize_chunk(c, fmt)
    return QTensor(out, fmt, (rows, cols))


def _dequantize_chunk(p: torch.Tensor, fmt: QFormat, cols: int) -> torch.Tensor:
    r = p.shape[0]
    g, ng, nd = fmt.group, cols // fmt.group, fmt.data_bytes(cols)
    d = _f16(p[:, nd: nd + 2 * ng]).to(torch.float32).reshape(r, ng, 1)
    data = p[:, :nd]
    if fmt.bits == 4:
        b = data.reshape(r, ng, g // 2)
        q = torch.cat([b & 15, b >> 4], dim=-1)
        if not fmt.asym:
            return (d * (q.to(torch.int8) - 8).to(torch.float32)).reshape(r, cols)
    elif not fmt.asym:
        return (data.view(torch.int8).to(torch.float32).reshape(r, ng, g) * d).reshape(r, cols)
    else:
        q = data.reshape(r, ng, g)
    m = _f16(p[:, nd + 2 * ng: nd + 4 * ng]).to(torch.float32).reshape(r, ng, 1)
    return (d * q.to(torch.float32) + m).reshape(r, cols)


def dequantize(qt: QTensor) -> torch.Tensor:
    """float32 [rows, cols] on qt's device: d·(q−8), d·q, or d·q + m per value (fp32 arithmetic)."""
    rows, cols = qt.shape
    out = torch.empty(rows, cols, dtype=torch.float32, device=qt.device)
    step = max(1, _CHUNK_VALUES // cols)
    for r0 in range(0, rows, step):
        out[r0: r0 + step] = _dequantize_chunk(qt.packed[r0: r0 + step], qt.fmt, cols)
    return out


def random_qtensor(rows: int, cols: int, fmt: QFormat, *, std: float = 0.02, device: torch.device | str = "cpu",
                   seed: int = 0) -> QTensor:
    """Random quantized bytes made where they will live (benchmark models: no float copy, no CPU round trip).

    Values are uniform over the format's codes; the scales make the weights' standard deviation `std`
    (uniform codes over 16 or 256 levels have standard deviation 4.61 / 73.9 codes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    nd, ng = fmt.data_bytes(cols), fmt.n_groups(cols)
    # one allocation, filled in place (codes, then scales, then offsets, the packed layout): no temporary
    # the size of the tensor, so that building many of them leaves no holes in the GPU allocator's pool
    packed = torch.empty(rows, fmt.row_bytes(cols), dtype=torch.uint8, device=device)
    spread = 4.61 if fmt.bits == 4 else 73.9
    if rows:
        packed[:, :nd].random_(0, 256, generator=g)
        _f16(packed[:, nd:nd + 2 * ng]).fill_(std / spread)
        if fmt.asym:
            _f16(packed[:, nd + 2 * ng:nd + 4 * ng]).fill_(-std / spread * (7.5 if fmt.bits == 4 else 127.5))
    return QTensor(packed, fmt, (rows, cols))


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_types() -> Any:
    from gguf import GGMLQuantizationType as Q

    return Q


def gguf_provenance(ggml_type: Any, fmt: QFormat, transpose: bool = False) -> str:
    """What converting a GGUF tensor of `ggml_type` into `fmt` does: KEPT (the values carried over exactly),
    QUANTIZED (a float source) or REQUANTIZED (dequantized, then quantized again).

    Kept: Q4_0 into q4 or q4a (group 32) or any q8 at group 32 (its 4-bit codes fit), Q4_1 into q4a or q8a
    (group 32), Q8_0 into q8 or q8a (group 32). A transposed tensor (the down projection stored by neuron)
    has its blocks along the other axis, so it is always quantized anew."""
    Q = _gguf_types()
    t = Q(int(ggml_type))
    if t in (Q.F32, Q.F16, Q.BF16):
        return QUANTIZED
    if transpose or fmt.group != 32:
        return REQUANTIZED
    kept = {
        Q.Q4_0: fmt.bits == 8 or fmt.bits == 4,
        Q.Q4_1: fmt.asym,
        Q.Q8_0: fmt.bits == 8,
    }
    return KEPT if kept.get(t, False) else REQUANTIZED


_GGUF_BLOCK = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per 32-value block: [d f16][m f16 (Q4_1)][codes]


def _gguf_dense(data: np.ndarray, ggml_type: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    from gguf.quants import dequantize as gg_dequantize

    Q = _gguf_types()
    try:
        if Q(int(ggml_type)) == Q.F32:
            arr = np.asarray(data).view(np.float32)
        else:
            arr = gg_dequantize(np.asarray(data), Q(int(ggml_type)))
    except NotImplementedError:
        raise InputError(f"tensor {name or '(unnamed)'} uses GGUF type {Q(int(ggml_type)).name}, which the gguf "
                         "package cannot dequantize", "use a GGUF quantized as F16, Q8_0, Q4_0, Q4_K ...") from None
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def from_gguf(data: np.ndarray, ggml_type: Any, shape: tuple[int, int], fmt: QFormat, *, transpose: bool = False,
              name: str = "") -> tuple[QTensor, str]:
    """A GGUF tensor -> (QTensor, provenance) on the CPU.

    data: the tensor's bytes as the gguf reader gives them (`ReaderTensor.data`); ggml_type its
    `tensor_type`; shape ours, [rows, cols] (the reverse of GGUF's ne order). transpose: store the
    transpose ([cols, rows]; the down projection by neuron). Kept conversions rearrange bytes only, so
    `dequantize` of the result equals `gguf.quants.dequantize` of the source bit for bit."""
    Q = _gguf_types()
    rows, cols = int(shape[0]), int(shape[1])
    how = gguf_provenance(ggml_type, fmt, transpose)
    if how != KEPT:
        w = torch.from_numpy(np.array(_gguf_dense(data, ggml_type, (rows, cols), name), copy=True, order="C"))
        if transpose:
            w = w.t().contiguous()
        return quantize(w, fmt.bits, fmt.group, fmt.asym, name=name), how
    t = Q(int(ggml_type))
    nb = cols // 32
    # a copy: the reader's bytes are a read-only memory map
    blk = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(rows, nb, _GGUF_BLOCK[t.name])
    d = blk[:, :, :2].reshape(rows, 2 * nb).contiguous().view(torch.float16)
    if t == Q.Q4_1:
        m = blk[:, :, 2:4].reshape(rows, 2 * nb).contiguous().view(torch.float16)
        codes = blk[:, :, 4:].reshape(rows, nb * 16)
    else:
        m = None
        codes = blk[:, :, 2:].reshape(rows, nb * (32 if t == Q.Q8_0 else 16))
    if t == Q.Q8_0:  # int8 codes
        if fmt.asym:  # q + 128 with offset -128·d
            codes = (codes.view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
            m = _exact_offset(d, -128.0, name)
        return QTensor.from_parts(codes, d, fmt, (rows, cols), m), how
    if fmt.bits == 8:  # 4-bit codes into bytes, in value order
        b = codes.reshape(rows, nb, 16)
        q = torch.cat([b & 15, b >> 4], dim=-1).reshape(rows, cols)
        if t == Q.Q4_0 and not fmt.asym:
            return QTensor.from_parts((q.to(torch.int8) - 8).view(torch.uint8), d, fmt, (rows, cols)), how
        if t == Q.Q4_0:
            m = _exact_offset(d, -8.0, name)
        return QTensor.from_parts(q, d, fmt, (rows, cols), m), how
    if t == Q.Q4_0 and fmt.asym:
        m = _exact_offset(d, -8.0, name)
    return QTensor.from_parts(codes, d, fmt, (rows, cols), m), how


def _exact_offset(d: torch.Tensor, k: float, name: str) -> torch.Tensor:
    """k·d in float16 (k a power of two: exact unless it overflows, which a real scale never does)."""
    m = (d.to(torch.float32) * k).to(torch.float16)
    if not bool(torch.isfinite(m).all()):
        raise InputError(f"tensor {name or '(unnamed)'} has scales too large for an asymmetric offset",
                         "export it with a symmetric format (q4, q8)")
    return m


def from_gguf_tensor(t: Any, fmt: QFormat, *, transpose: bool = False) -> tuple[QTensor, str]:
    """`from_gguf` for a `gguf.ReaderTensor` (shape taken from its ne list)."""
    ne = [int(x) for x in t.shape]
    if len(ne) != 2:
        raise InputError(f"GGUF tensor {t.name} has {len(ne)} dimensions; only matrices are quantized",
                         "keep it in a float dtype")
    return from_gguf(t.data, t.tensor_type, (ne[1], ne[0]), fmt, transpose=transpose, name=t.name)


__all__ = ["BITS", "DEFAULT_GROUP", "KEPT", "QUANTIZED", "REQUANTIZED", "PROVENANCES", "QFormat", "QTensor",
           "parse_format", "row_bytes", "neuron_bytes", "hcat", "quantize", "dequantize", "random_qtensor",
           "gguf_provenance", "from_gguf", "from_gguf_tensor"]
