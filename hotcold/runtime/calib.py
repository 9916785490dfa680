"""Measure the numbers the cost model needs, with the engine's own kernels, and write a HardwareSpec.

GPU: a device-to-device copy (read + write bytes) and an fp16 matrix-vector product over 1 GiB; PCIe:
pinned host<->device copies of 256 MiB; sync: a 32 KB round trip + stream synchronise (what a split
layer pays); CPU: a plain read (torch sum) and the cold kernel itself on one LLaMA-70B-shaped layer's
cold rows, per weight dtype, backend, cold mode and thread count. The spec's cpu.bandwidth is the cold
kernel's predictor-mode rate (what the engine achieves), not the DRAM peak.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from hotcold.devices import median_time


def _t(fn: Callable[[], Any], reps: int, sync: Callable[[], None] | None = None, warm: int = 2) -> float:
    return median_time(fn, reps, sync, warm)


def cold_kernel_table(dim: int = 8192, rows: int = 22938, density: float = 0.10,
                      dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32"),
                      threads: tuple[int | None, ...] = (None,), backends: tuple[str, ...] = ("numba", "torch"),
                      modes: tuple[str, ...] = ("predictor", "threshold", "exact"), reps: int = 5,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The cold kernel's achieved GB/s on one layer's cold rows (sampled active set at `density`)."""
    from hotcold.runtime.coldkernel import ColdKernel, numba_available

    out = []
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        tdt = getattr(torch, dt)
        gate = (torch.randn(rows, dim, generator=g) * dim ** -0.5).to(tdt)
        ud = (torch.randn(rows, 2 * dim, generator=g) * dim ** -0.5).to(tdt)
        x = torch.randn(dim, generator=g)
        sel = torch.from_numpy((np.random.default_rng(0).random(rows) < density).astype(np.uint8))
        for be in backends:
            if be == "numba" and not numba_available():
                continue
            for th in threads:
                k = ColdKernel(dim, be, th)
                if be == "numba":
                    k.warm_up(tdt)
                for mode in modes:
                    if be == "torch" and mode == "exact" and dt != "float16":
                        continue
                    # threshold: t so that about `density` of the rows fire
                    thr = 1.2 if mode == "threshold" else 0.0
                    rs = []

                    def run():
                        rs.append(k(x, gate, ud, mode, mask=sel, thr=thr, active=torch.zeros(rows, dtype=torch.uint8)
                                    if mode != "predictor" else sel))

                    t = _t(run, reps if be == "numba" else 2, warm=1)
                    r = rs[-1]
                    row = {"dtype": dt, "backend": be, "threads": th or (torch.get_num_threads() if be == "torch" else
                                                                         _numba_threads()),
                           "mode": mode, "rows": rows, "active": r.n_active, "bytes": r.bytes_read,
                           "ms": t * 1e3, "GBps": r.bytes_read / t / 1e9}
                    out.append(row)
                    log(f"cold kernel {dt} {be} t={row['threads']} {mode}: {row['ms']:.3f} ms, {row['GBps']:.1f} GB/s "
                        f"({r.n_active} active)")
        del gate, ud
    return out


def _numba_threads() -> int:
    import numba

    return numba.get_num_threads()


def device_numbers(log: Callable[[str], None] = print) -> dict[str, Any]:
    """GPU copy and gemv bandwidth, PCIe, sync round trip, CPU read bandwidth."""
    import torch.nn.functional as F

    m: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    big = torch.randn(1 << 28, dtype=torch.float32).to(torch.float16)  # 512 MiB
    m["cpu_sum_GBps"] = big.numel() * 2 / _t(lambda: big.sum(), 5) / 1e9
    w = torch.randn(8192, 8192).to(torch.float16)
    xx = torch.randn(8192).to(torch.float16)
    m["cpu_flinear_fp16_GBps"] = w.numel() * 2 / _t(lambda: F.linear(xx, w), 5) / 1e9
    del big, w
    if not torch.cuda.is_available():
        return m
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    m["gpu_name"] = torch.cuda.get_device_name(dev)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    m["gpu_copy_GBps_read_plus_write"] = 2 * a.numel() / _t(lambda: b.copy_(a), 20, sync) / 1e9
    del a, b
    gw = torch.randn(65536, 8192, device=dev, dtype=torch.float16)
    gx = torch.randn(8192, device=dev, dtype=torch.float16)
    m["gpu_gemv_GBps"] = gw.numel() * 2 / _t(lambda: F.linear(gx, gw), 50, sync) / 1e9
    ga = torch.randn(65536, device=dev, dtype=torch.float16)
    m["gpu_vecmat_GBps"] = gw.numel() * 2 / _t(lambda: torch.matmul(ga, gw), 50, sync) / 1e9
    del gw
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    d = torch.empty_like(host, device=dev)
    m["pcie_h2d_GBps"] = host.numel() / _t(lambda: d.copy_(host, non_blocking=True), 10, sync) / 1e9
    m["pcie_d2h_GBps"] = host.numel() / _t(lambda: host.copy_(d, non_blocking=True), 10, sync) / 1e9
    sh = torch.empty(32 * 1024, dtype=torch.uint8).pin_memory()
    sd = torch.empty_like(sh, device=dev)

    def rt():
        sd.copy_(sh, non_blocking=True)
        sh.copy_(sd, non_blocking=True)
        sync()

    m["sync_round_trip_us"] = _t(rt, 200) * 1e6
    ev = torch.cuda.Event()

    def rt_event():
        sd.copy_(sh, non_blocking=True)
        sh.copy_(sd, non_blocking=True)
        ev.record()
        ev.synchronize()

    m["event_round_trip_us"] = _t(rt_event, 200) * 1e6
    log(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
    return m


def measured_spec(m: dict[str, Any], cold_GBps: float, name: str = "h200-measured"):
    """A HardwareSpec from `device_numbers` + the cold kernel's rate (starting from the h200 preset)."""
    import dataclasses

    from hotcold.solver.hardware import preset

    base = preset("h200")
    gpu = dataclasses.replace(base.gpu, bandwidth=m["gpu_gemv_GBps"] * 1e9)
    cpu = dataclasses.replace(base.cpu, bandwidth=cold_GBps * 1e9, threads=m.get("cpu_count") or base.cpu.threads)
    link = dataclasses.replace(base.link, pcie_bandwidth=min(m["pcie_h2d_GBps"], m["pcie_d2h_GBps"]) * 1e9,
                               sync_seconds=m["event_round_trip_us"] * 1e-6)
    notes = dict(base.notes)
    notes.update({"gpu.bandwidth": "measured: fp16 F.linear over 1 GiB (hotcold.runtime.calib)",
                  "cpu.bandwidth": "measured: the engine's numba cold kernel, predictor mode, fp16, 10% of one "
                                   "70B layer's cold rows",
                  "link": "measured: pinned 256 MiB copies; 32 KB round trip + event sync"})
    return dataclasses.replace(base, name=name, gpu=gpu, cpu=cpu, link=link, source="measured (hotcold.runtime.calib)",
                               notes=notes, measurements=m)


def call_pattern(threads: tuple[int, ...], dim: int = 8192, rows: int = 22938, density: float = 0.10,
                 gap_s: float = 1.5e-4, calls: int = 200, layers: int = 10, log: Callable[[str], None] = print,
                 kernels: tuple[tuple[int, bool], ...] = ((1, False),), read_peak: bool = True) -> list[dict[str, Any]]:
    """The cold kernel as the engine calls it: one predictor-mode call per layer over `layers` layers' cold
    rows (gigabytes, so nothing stays in cache), separated by `gap_s` of host work (the GPU's part of a
    layer), so that thread wake-up costs show. Median per call, for each thread count x `kernels`
    ((group, dynamic): neurons streamed side by side, dynamic schedule).

    With `read_peak`, the plain read rate of the same memory is measured too (`read_ceiling`), as a
    row with group 0: the CPU side of the machine's floor."""
    from hotcold.runtime.coldkernel import ColdKernel

    rng = np.random.default_rng(0)
    pattern = torch.from_numpy((rng.standard_normal((64, 3 * dim)) * dim ** -0.5).astype(np.float16))
    sels = [[torch.from_numpy((rng.random(rows) < density).astype(np.uint8)) for _ in range(4)] for _ in range(layers)]
    x = torch.from_numpy(rng.standard_normal(dim).astype(np.float32))
    t0 = time.perf_counter()
    mem = []
    for _ in range(layers):
        gate, ud = torch.empty(rows, dim, dtype=torch.float16), torch.empty(rows, 2 * dim, dtype=torch.float16)
        for r0 in range(0, rows, 64):  # written, not just allocated: every page is backed
            n = min(64, rows - r0)
            gate[r0:r0 + n] = pattern[:n, :dim]
            ud[r0:r0 + n] = pattern[:n, dim:]
        mem.append((gate, ud))
    log(f"call pattern: {layers} layers x {rows} cold rows written in {time.perf_counter() - t0:.1f} s")
    out = []
    if read_peak:
        out.append(read_ceiling([t for pair in mem for t in pair], threads[0], log))
    for th, (gr, dy) in [(t_, k_) for t_ in threads for k_ in kernels]:
        k = ColdKernel(dim, "numba", th, gr, dy)
        k.warm_up(torch.float16)
        ts, nb = [], []
        for i in range(calls + 20):
            layer = i % layers
            t_end = time.perf_counter() + gap_s
            while time.perf_counter() < t_end:
                pass
            t0 = time.perf_counter()
            r = k(x, mem[layer][0], mem[layer][1], "predictor", mask=sels[layer][(i // layers) % 4])
            if i >= 20:
                ts.append(time.perf_counter() - t0)
                nb.append(r.bytes_read)
        med = statistics.median(ts)
        row = {"threads": th, "group": gr, "dynamic": dy, "ms_median": med * 1e3,
               "ms_mean": 1e3 * sum(ts) / len(ts), "GBps_median": statistics.median(nb) / med / 1e9,
               "GBps_total": sum(nb) / sum(ts) / 1e9, "layers": layers, "gap_ms": gap_s * 1e3,
               "env": {k_: os.environ.get(k_) for k_ in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY")}}
        out.append(row)
        log(f"call pattern t={th} group={gr} dynamic={dy}: {row['ms_median']:.3f} ms median, "
            f"{row['ms_mean']:.3f} mean, {row['GBps_median']:.1f} GB/s (all calls {row['GBps_total']:.1f})  "
            f"{row['env']}")
    return out


@functools.lru_cache(maxsize=None)
def _read_kernels() -> dict[int, Any]:
    """{streams: kernel} XOR-reducing a flat uint64 array (vectorises; no arithmetic to wait for): threads
    take `chunk`-element blocks from a shared counter (the cold kernel's dynamic schedule: a slow core
    does fewer), each read as 1 or 8 interleaved sub-blocks (DRAM streams in flight per core)."""
    from numba import get_num_threads, njit, prange

    from hotcold.runtime.coldkernel import fetch_add

    fa = fetch_add()

    @njit(parallel=True, nogil=True, fastmath=True)
    def read1(a, chunk, ctr):
        nblk = a.shape[0] // chunk
        T = get_num_threads()
        parts = np.zeros(T, dtype=np.uint64)
        ctr[0] = 0
        for t in prange(T):
            s = np.uint64(0)
            while True:
                b = fa(ctr, np.int64(1))
                if b >= nblk:
                    break
                for i in range(b * chunk, (b + 1) * chunk):
                    s ^= a[i]
            parts[t] = s
        r = np.uint64(0)
        for t in range(T):
            r ^= parts[t]
        return r

    @njit(parallel=True, nogil=True, fastmath=True)
    def read8(a, chunk, ctr):
        nblk = a.shape[0] // chunk
        T = get_num_threads()
        m = chunk // 8
        parts = np.zeros(T, dtype=np.uint64)
        ctr[0] = 0
        for t in prange(T):
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.uint64(0)
            while True:
                b = fa(ctr, np.int64(1))
                if b >= nblk:
                    break
                o = b * chunk
                for i in range(o, o + m):
                    s0 ^= a[i]
                    s1 ^= a[i + m]
                    s2 ^= a[i + 2 * m]
                    s3 ^= a[i + 3 * m]
                    s4 ^= a[i + 4 * m]
                    s5 ^= a[i + 5 * m]
                    s6 ^= a[i + 6 * m]
                    s7 ^= a[i + 7 * m]
            parts[t] = s0 ^ s1 ^ s2 ^ s3 ^ s4 ^ s5 ^ s6 ^ s7
        r = np.uint64(0)
        for t in range(T):
            r ^= parts[t]
        return r

    return {1: read1, 8: read8}


def read_ceiling(arrays: list[torch.Tensor], threads: int, log: Callable[[str], None] = print,
                 chunk: int = 1 << 15) -> dict[str, Any]:
    """This machine's CPU read rate over `arrays` (each read once per pass, best of 3 passes, the better
    of 1 and 8 streams per core, blocks handed out dynamically): the most a kernel reading these bytes
    could get, as far as a plain read can tell (dynamic blocks because with static ones a slow core holds
    every pass up and the ceiling reads below what the cold kernel reaches)."""
    import numba

    numba.set_num_threads(threads)
    flat = [t.reshape(-1).view(torch.int64).numpy().view(np.uint64) for t in arrays]
    nbytes = sum(a.nbytes for a in flat)
    best: dict[str, Any] = {}
    ctr = np.zeros(1, dtype=np.int64)
    for st, f in _read_kernels().items():
        f(flat[0][:4 * chunk], chunk, ctr)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            for a in flat:
                f(a, chunk, ctr)
            ts.append(time.perf_counter() - t0)
        rate = nbytes / min(ts) / 1e9
        log(f"read ceiling: {threads} threads, {st} stream(s) per core, {nbytes / 1e9:.1f} GB: {rate:.1f} GB/s")
        if rate > best.get("GBps_median", 0):
            best = {"threads": threads, "group": 0, "kind": "read_peak", "streams": st, "GBps_median": rate,
                    "bytes": nbytes}
    return best


def triton_gemv_probe(log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Does a plain Triton GEMV beat cuBLAS (F.linear) at batch 1 on a 70B FFN-sized matrix? (measure only)"""
    import torch.nn.functional as F
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(W, X, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(W + rows[:, None] * K + cols[None, :], mask=rows[:, None] < N, other=0.0)
            x = tl.load(X + cols)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(Y + rows, acc, mask=rows < N)

    dev = torch.device("cuda")
    N, K = 57344, 8192
    w = torch.randn(N, K, device=dev, dtype=torch.float16)
    x = torch.randn(K, device=dev, dtype=torch.float16)
    y = torch.empty(N, device=dev, dtype=torch.float32)
    ref = F.linear(x, w).float()
    sync = torch.cuda.synchronize
    out = [{"kernel": "F.linear", "GBps": w.numel() * 2 / _t(lambda: F.linear(x, w), 30, sync) / 1e9}]
    for bn, bk, nw in ((4, 512, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8)):
        try:
            def run():
                gemv[(triton.cdiv(N, bn),)](w, x, y, N, K, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
            run()
            sync()
            err = float((y - ref).norm() / ref.norm())
            out.append({"kernel": f"triton bn={bn} bk={bk} warps={nw}", "rel_err": err,
                        "GBps": w.numel() * 2 / _t(run, 30, sync) / 1e9})
        except Exception as ex:  # noqa: BLE001 - a probe: record and go on
            out.append({"kernel": f"triton bn={bn} bk={bk} warps={nw}", "error": repr(ex)[:200]})
    for r in out:
        log(f"gemv probe: {r}")
    return out
