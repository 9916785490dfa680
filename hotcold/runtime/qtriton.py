"""The GPU side's Triton kernels over quantized rows (hotcold.quant's INT4/INT8 format), batch-1 decode.

The quantized counterparts of hotcold.runtime.triton_ops' three weight-streaming kernels, with the same
options, so the engine can call them where a matrix is a QTensor:

    qgemv        Y[n] (+)= act(r · Σ_k W[n, k] x_k)   x = X, or h·nw with r = rsqrt(mean(h²) + eps) (NORM);
                 split-K over a second grid axis (atomic float32 adds) when too few row blocks fill the GPU
    qgate_up     A[n] = silu(g_n) · u_n for W [2k, D]: slot n's gate row at 2n, its up row at 2n + 1 (the hot
                 part's gate and up rows side by side, as triton_ops.gate_up's [k, 2, D])
    qvecmat_add  Y[d] += Σ_r A[r] W[r, d] for W [k, D] quantized along D (the hot down rows stored by neuron),
                 rows split over programs, atomic adds

Dequantization happens in registers: a tile of W is BLOCK_N rows × BLOCK_K values = BLOCK_K/g groups of
g values. A group's bytes unpack into its two runs of g/2 consecutive values (INT4: the low and high
nibbles; INT8: the first and second half), each multiplied with the matching run of x; per group the
float32 sum Σ q_i x_i is scaled by the group's fp16 scale d and the offset term o · Σ x_i is added
(o = −8d for symmetric INT4, 0 for symmetric INT8, the stored offset when asymmetric): exactly
Σ_i (d q_i + o) x_i in float32. Codes, scales and offsets are read once; nothing is written back to memory.

Limits: the quantization group must be a power of two (tl.arange), and BLOCK_K a multiple of it. NORM
and RELU need a row's whole sum, so they run without split-K.
Tests run these kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1) at toy shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from hotcold.quant import QTensor
from hotcold.runtime.triton_ops import GpuOps, available  # noqa: F401 - available() is this module's too


def _kernels() -> dict[str, Any]:
    import triton

    from hotcold.runtime import qtriton_jit as k

    return {"qgemv": k.qgemv, "qgate_up": k.qgate_up, "qvecmat_add": k.qvecmat_add, "triton": triton}


# (BLOCK_N, BLOCK_K, num_warps): an INT4 tile of BLOCK_K values is a quarter of fp16's bytes, so the
# candidates stream longer K tiles than triton_ops' GEMV_CONFIGS; the first is used where nothing was timed
# (BLOCK_N, BLOCK_K, warps[, element-wise accumulation]): the tuner times each on the real shape
QGEMV_CONFIGS = ((16, 1024, 8), (8, 1024, 4), (32, 512, 8), (4, 2048, 8), (16, 512, 4),
                 (16, 512, 8, 1), (8, 1024, 8, 1), (32, 256, 8, 1), (16, 256, 4, 1), (64, 256, 8, 1))
QVECMAT_CONFIGS = ((16, 512, 4), (32, 256, 4), (8, 1024, 8))
INTERP_QGEMV = (4, 64, 4)  # small blocks for the interpreter at toy shapes
INTERP_QVECMAT = (4, 64, 4)
SPLIT_WAVES = 4  # split K until the grid has about this many programs per SM


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class QGpuOps(GpuOps):
    """GpuOps plus the quantized kernels (one instance per engine serves fp16 and quantized matrices)."""

    def __init__(self, device: torch.device, tune: bool = True):
        super().__init__(device, tune)
        self.qk = _kernels()

    def _sms(self) -> int:
        return torch.cuda.get_device_properties(self.device).multi_processor_count if not self.interp else 4

    @staticmethod
    def _views(w: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, fp16 view) of w's packed bytes: int8 codes for symmetric INT8."""
        if not _pow2(w.group):
            from hotcold.errors import InputError

            raise InputError(f"the GPU kernels need a power-of-two quantization group, not {w.group}",
                             "export the Bundle with group 32, 64 or 128")
        p = w.packed
        if not p.is_contiguous():
            raise ValueError("quantized GPU weights must be contiguous")
        codes = p.view(torch.int8) if (w.bits == 8 and not w.asym) else p
        return codes, p.view(torch.float16)

    def _pick_q(self, key: tuple, configs, launch, interp_cfg) -> tuple:
        if self.interp:
            return interp_cfg
        return self._pick(key, configs, launch)

    def qgemv(self, w: QTensor, out: torch.Tensor, *, x: torch.Tensor | None = None, h: torch.Tensor | None = None,
              nw: torch.Tensor | None = None, eps: float = 0.0, acc: bool = False, relu: bool = False,
              split: int | None = None) -> None:
        """out (+)= act(w · x), or w · rms_norm(h, nw) when h is given (w a QTensor [N, K] on the device).

        split: K splits (None: chosen so that the grid fills the GPU; only without NORM / RELU and for a
        float32 `out`, since the partial sums are added atomically)."""
        N, K = w.shape
        norm = h is not None
        xa = h if norm else x
        nwa = nw if norm else xa
        codes, p16 = self._views(w)
        tr = self.qk["triton"]
        can_split = not norm and not relu and out.dtype == torch.float32

        def launch(cfg, scratch=False):
            bn, bk, nwarps, *ew = cfg
            bk = max(bk, w.group)
            nblk = tr.cdiv(N, bn)
            ktiles = tr.cdiv(K, bk)
            s = split if split is not None else (min(ktiles, max(1, tr.cdiv(SPLIT_WAVES * self._sms(), nblk)))
                                                 if can_split else 1)
            if s > 1 and not can_split:
                raise ValueError("split-K needs a float32 output and no norm / relu")
            k_per = tr.cdiv(ktiles, s) * bk
            s = tr.cdiv(K, k_per)
            y = (torch.zeros_like(out) if scratch else out)
            if s > 1 and not acc and not scratch:
                y.zero_()
            self.qk["qgemv"][(nblk, s)](
                codes, p16, xa, xa, nwa, y, N, K, w.row_bytes, k_per, eps, NORM=norm, ACC=acc, RELU=relu,
                SPLIT=s > 1, BITS=w.bits, ASYM=w.asym, GS=w.group, BLOCK_N=bn, BLOCK_K=bk, EW=bool(ew and ew[0]),
                num_warps=nwarps)

        launch(self._pick_q(("qgemv", N, K, norm, w.fmt.name, split), QGEMV_CONFIGS, launch, INTERP_QGEMV))

    def qgate_up(self, w: QTensor, a_out: torch.Tensor, *, x: torch.Tensor | None = None,
                 h: torch.Tensor | None = None, nw: torch.Tensor | None = None, eps: float = 0.0,
                 s_out: torch.Tensor | None = None) -> None:
        """a_out = silu(g)·u for the k hot slots of w [2k, D] (rows 2n, 2n + 1: slot n's gate and up rows)."""
        k2, D = w.shape
        k = k2 // 2
        if k == 0:
            return
        norm = h is not None
        xa = h if norm else x
        nwa = nw if norm else xa
        s = s_out if s_out is not None else a_out
        codes, p16 = self._views(w)

        def launch(cfg, scratch=False):
            bn, bk, nwarps, *ew = cfg
            bn = max(1, bn // 2)  # two rows per slot
            bk = max(bk, w.group)
            y = torch.empty_like(a_out) if scratch else a_out
            ys = torch.empty_like(s) if scratch else s
            self.qk["qgate_up"][(self.qk["triton"].cdiv(k, bn),)](
                codes, p16, xa, xa, nwa, y, ys, k, D, w.row_bytes, eps, NORM=norm, WRITE_S=s_out is not None,
                BITS=w.bits, ASYM=w.asym, GS=w.group, BLOCK_N=bn, BLOCK_K=bk, EW=bool(ew and ew[0]),
                num_warps=nwarps)

        launch(self._pick_q(("qgate_up", k, D, norm, w.fmt.name), QGEMV_CONFIGS, launch, INTERP_QGEMV))

    def qvecmat_add(self, a: torch.Tensor, w: QTensor, y: torch.Tensor) -> None:
        """y [D] float32 += a [k] · w [k, D] (w quantized along D)."""
        k, D = w.shape
        if k == 0:
            return
        codes, p16 = self._views(w)
        tr = self.qk["triton"]

        def launch(cfg, scratch=False):
            br, bd, nwarps = cfg
            bd = max(bd, w.group)
            nd = tr.cdiv(D, bd)
            splits = max(1, min(tr.cdiv(k, br), (SPLIT_WAVES * self._sms() + nd - 1) // nd))
            rows_per = tr.cdiv(tr.cdiv(k, splits), br) * br
            splits = tr.cdiv(k, rows_per)
            yy = torch.zeros_like(y) if scratch else y
            self.qk["qvecmat_add"][(nd, splits)](a, codes, p16, yy, k, D, w.row_bytes, rows_per, BITS=w.bits,
                                                  ASYM=w.asym, GS=w.group, BLOCK_R=br, BLOCK_D=bd,
                                                  num_warps=nwarps)

        launch(self._pick_q(("qvecmat", k, D, w.fmt.name), QVECMAT_CONFIGS, launch, INTERP_QVECMAT))


__all__ = ["QGpuOps", "QGEMV_CONFIGS", "QVECMAT_CONFIGS", "available"]
