"""Moving neurons of a quantized model between its GPU slots and its CPU slots, synchronously.

A quantized neuron is three rows of the same format (hotcold.quant): its gate row, its up row and its
down column. The two sides lay them out differently:
  GPU  hot_gu [2k, D]: rows 2s, 2s + 1 = slot s's gate and up rows; hot_down [k, D]: row s = its down column
  CPU  gate [C, D]: row j = slot j's gate row; up_down [C, 2D] = hcat(up, down) (data, then scales)
so a move is a byte copy plus a rearrangement of each row's sections (quant.split_cols / quant.hcat): no
value is dequantized or quantized again, and a neuron computes the same on either side.

`swap_neurons` exchanges hot slots with cold slots of one layer (the GPU memory never changes);
`rehome` gives a layer a new hot set of the same size (a placement re-chosen after a prompt's prefill)
and returns what it moved and how long the copies took. The graphs the engine captured stay valid:
every write is in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from hotcold.errors import InputError
from hotcold.quant import QTensor, hcat


REHOME_CHUNK = 2048  # neurons per swap_neurons call in rehome


@dataclass
class MoveStats:
    neurons: int = 0
    bytes: int = 0  # both directions
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"neurons": self.neurons, "bytes": self.bytes, "seconds": self.seconds,
                "us_per_neuron": 1e6 * self.seconds / self.neurons if self.neurons else None}


def split_cols(t: QTensor, cols: int) -> tuple[QTensor, QTensor]:
    """[rows, ca + cb] -> ([rows, cols], [rows, ca + cb - cols]): the inverse of hcat (cols a multiple of
    the group size)."""
    rows, total = t.shape
    g = t.fmt.group
    if cols % g or (total - cols) % g:
        raise ValueError(f"split at column {cols} of {total} does not fall on a group of {g}")
    nd = t.fmt.data_bytes(cols)
    ng = cols // g
    off = t.offsets if t.asym else None
    a = QTensor.from_parts(t.data[:, :nd], t.scales[:, :ng], t.fmt, (rows, cols),
                           off[:, :ng] if off is not None else None)
    b = QTensor.from_parts(t.data[:, nd:], t.scales[:, ng:], t.fmt, (rows, total - cols),
                           off[:, ng:] if off is not None else None)
    return a, b


def _check(eng: Any) -> None:
    if not getattr(eng, "quantized", False):
        raise InputError("swap_neurons moves the rows of a quantized model",
                         "use hotcold.runtime.dynamic.DynamicPlacement for float16 models")
    if any(c.gate is None for c in eng.cl):
        raise InputError("this model's cold rows are in the split layout", "re-export with --cpu-layout bundled")


def swap_neurons(eng: Any, l: int, hot_slots: Sequence[int], cold_slots: Sequence[int]) -> int:
    """Exchange hot slot hot_slots[i] of layer l with its cold slot cold_slots[i]; returns the bytes copied
    (both directions). The neurons keep their ids: what moved is recorded in the slot -> neuron maps."""
    _check(eng)
    hs = np.asarray(hot_slots, dtype=np.int64)
    cs = np.asarray(cold_slots, dtype=np.int64)
    if hs.shape != cs.shape or hs.ndim != 1:
        raise ValueError("hot_slots and cold_slots must be 1-D and of the same length")
    m = int(hs.shape[0])
    if m == 0:
        return 0
    g, c = eng.gl[l], eng.cl[l]
    dev = eng.device
    D = eng.cfg.dim
    fmt = c.gate.fmt
    hs_d = torch.from_numpy(hs).to(dev)
    cs_h = torch.from_numpy(cs)
    # incoming: the cold slots' rows, gathered on the host and copied up
    pin = eng.cuda
    in_g = c.gate.packed.index_select(0, cs_h)
    in_ud = c.up_down.packed.index_select(0, cs_h)
    if pin:
        in_g, in_ud = in_g.pin_memory(), in_ud.pin_memory()
    in_g, in_ud = in_g.to(dev, non_blocking=True), in_ud.to(dev, non_blocking=True)
    up, down = split_cols(QTensor(in_ud, fmt, (m, 2 * D)), D)
    # outgoing: the hot slots' rows, rearranged on the device and copied down
    gu = g.hot_gu.packed
    out_g = gu.index_select(0, 2 * hs_d)
    out_u = QTensor(gu.index_select(0, 2 * hs_d + 1), fmt, (m, D))
    out_d = QTensor(g.hot_down.packed.index_select(0, hs_d), fmt, (m, D))
    out_ud = hcat(out_u, out_d).packed
    out_g, out_ud = out_g.to("cpu"), out_ud.to("cpu")
    gu.index_copy_(0, 2 * hs_d, in_g)
    gu.index_copy_(0, 2 * hs_d + 1, up.packed)
    g.hot_down.packed.index_copy_(0, hs_d, down.packed)
    c.gate.packed.index_copy_(0, cs_h, out_g)
    c.up_down.packed.index_copy_(0, cs_h, out_ud)
    a, b = g.hot_ids[hs].copy(), c.cold_ids[cs].copy()
    g.hot_ids[hs], c.cold_ids[cs] = b, a
    eng.hot_ids_dev[l].index_copy_(0, hs_d, torch.from_numpy(b).to(dev))
    eng.cold_ids_dev[l].index_copy_(0, cs_h.to(dev), torch.from_numpy(a).to(dev))
    hc = eng.hot_count[l].index_select(0, hs_d).cpu().numpy()  # counts follow their neurons
    eng.hot_count[l].index_copy_(0, hs_d, torch.from_numpy(eng.cold_count[l][cs].copy()).to(dev))
    eng.cold_count[l][cs] = hc
    if eng.cuda:
        torch.cuda.synchronize(dev)
    return 2 * m * 3 * fmt.row_bytes(D)


def rehome(eng: Any, l: int, hot_ids: Sequence[int]) -> MoveStats:
    """Give layer l the hot set `hot_ids` (neuron ids, as many as it has hot slots): the neurons of the new
    set that are cold take the slots of the hot neurons that are not in it."""
    g, c = eng.gl[l], eng.cl[l]
    want = np.asarray(hot_ids, dtype=np.int64)
    if want.shape[0] != g.n_hot:
        raise InputError(f"layer {l} has {g.n_hot} hot slots, the new hot set {want.shape[0]} neurons",
                         "pass as many neurons as the layer has GPU slots (the GPU memory does not change)")
    t0 = time.perf_counter()
    leave = np.flatnonzero(~np.isin(g.hot_ids, want))
    enter = np.flatnonzero(np.isin(c.cold_ids, want))
    if len(leave) != len(enter):
        raise InputError(f"layer {l}: the new hot set names neurons that are neither hot nor cold here",
                         "pass neuron ids of this layer, each once")
    b = 0
    for i in range(0, len(leave), REHOME_CHUNK):  # in pieces: the GPU temporaries stay ~chunk x 40 KB at 70B
        b += swap_neurons(eng, l, leave[i:i + REHOME_CHUNK], enter[i:i + REHOME_CHUNK])
    return MoveStats(neurons=int(len(leave)), bytes=b, seconds=time.perf_counter() - t0)
