"""The cold kernels of the `split` CPU layout (hotcold.bundle): after one dense gemv over the stored
[D, 2C] gate/up matrix, the down rows of the active neurons.

    down(w [nnz], idx [nnz] int64, offsets [N] int64, rows [c, D]) -> y [N, D]
        y[t] = Σ_{k in token t's slice} w[k] · rows[idx[k]]   (CSR slices idx[offsets[t]:offsets[t+1]])
    threshold_down(a [c], t, rows [c, D]) -> (y [1, D], m)
        one decoding token under the product rule: y = Σ_{j: |a_j| > t} a_j · rows[j], m = #{j: |a_j| > t}

`CKernel` (the default where a C compiler is present, ckernel.py): `threshold_down` in one compiled call,
`down` as `TorchKernel`. `TorchKernel.down` is `embedding_bag` (weighted row sums read in place, nothing
copied). embedding_bag parallelises over bags only, so with 4 or more threads a single token's active
list is cut into one bag per thread and the partial sums added; with 2 threads one bag is faster
(docs/runtime.md has the measurements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


SPLIT_BAG_MIN_THREADS = 4  # see the module docstring


class TorchKernel:
    name = "torch"

    def down(self, w: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        p = torch.get_num_threads()
        if offsets.numel() == 1 and p >= SPLIT_BAG_MIN_THREADS and idx.numel() >= 64 * p:
            step = -(-idx.numel() // p)
            parts = torch.arange(0, idx.numel(), step)
            return F.embedding_bag(idx, rows, parts, mode="sum", per_sample_weights=w).sum(0, keepdim=True)
        return F.embedding_bag(idx, rows, offsets, mode="sum", per_sample_weights=w)

    def threshold_down(self, a: torch.Tensor, t: float, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        kept = F.hardshrink(a, t)  # one op for |a| > t: an active a is never 0
        idx = kept.nonzero().squeeze(1)
        return self.down(kept.index_select(0, idx), idx, _ZERO, rows), idx.numel()


class CKernel(TorchKernel):
    """`threshold_down` compiled (ckernel.py) for float32 on the CPU; everything else as TorchKernel."""

    name = "c"

    def __init__(self, lib=None):
        from hotcold.runtime import ckernel

        self.lib = lib or ckernel.load()
        if self.lib is None:
            from hotcold.errors import InputError

            raise InputError("the `c` CPU kernel could not be built (no C compiler with OpenMP?)", "use --kernel torch")
        self.fn = self.lib.hc_threshold_down
        self.scratch = ckernel.Scratch()

    def threshold_down(self, a: torch.Tensor, t: float, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        if (a.dtype != torch.float32 or rows.dtype != torch.float32 or a.device.type != "cpu"
                or not a.is_contiguous() or not rows.is_contiguous()):
            return super().threshold_down(a, t, rows)
        c, D = rows.shape
        p = torch.get_num_threads()
        idx, w, acc = self.scratch.get(c, D, p)
        y = torch.empty(1, D, dtype=torch.float32)
        m = self.fn(a.data_ptr(), c, t, rows.data_ptr(), D, y.data_ptr(), idx.data_ptr(), w.data_ptr(),
                    acc.data_ptr(), p)
        return y, int(m)


KERNELS = {TorchKernel.name: TorchKernel, CKernel.name: CKernel}


def get_kernel(kernel: str | object | None):
    from hotcold.errors import InputError

    if kernel is None or kernel == "auto":  # the compiled kernel where it builds, else torch
        from hotcold.runtime import ckernel

        lib = ckernel.load()
        return CKernel(lib) if lib is not None else TorchKernel()
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise InputError(f"unknown CPU kernel {kernel!r}", f"use one of: auto, {', '.join(KERNELS)}")
        return KERNELS[kernel]()
    return kernel


_ZERO = torch.zeros(1, dtype=torch.long)
