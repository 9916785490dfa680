"""HardwareSpec (design.md §2): memory, bandwidths and sync latency of a GPU+CPU machine, presets, calibration.

A spec is a small JSON file (`kind: hardware`, `format_version: 2`). Every number says where it comes
from (`source`, `notes`): a datasheet, a paper, or a measurement by `hotcold calibrate`.

    gpu   {name, memory_bytes, bandwidth, sparse_bandwidth, reserve_bytes}
    cpu   {name, memory_bytes, bandwidth, threads, reserve_bytes}
    link  {pcie_bandwidth, sync_seconds, host_overhead_seconds, shared_memory}
    dtype, source, notes {field: where the number comes from}, measurements {...}

link.sync_seconds is the exchange itself (FFN input out, partial sum back, synchronise: what a 32 KB
round trip measures); link.host_overhead_seconds is the rest of what a layer with CPU work costs the
engine outside both sides' kernels (launches, waiting for the attention, the CPU kernel's parallel-region
start). Both are paid once per layer that has a cold neuron; only sync_seconds enters C_l
(docs/cost-model.md says why). Version 1 files have no host_overhead_seconds and load with 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hotcold.devices import median_time
from hotcold.errors import IncompatibleError, InputError
from hotcold.memory import canonical_dtype

KIND = "hardware"
FORMAT_VERSION = 2
READS = (1, 2)  # version 1: no link.host_overhead_seconds (read as 0)
GiB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    bandwidth: float  # B/s reading weights resident in GPU memory (dense matrix-vector)
    sparse_bandwidth: float | None = None  # effective B/s when a predictor lets it skip inactive rows
    reserve_bytes: int = 0  # not available to tensors: CUDA context, allocator slack


@dataclass(frozen=True)
class CpuSpec:
    name: str
    memory_bytes: int
    bandwidth: float  # B/s of the CPU's FFN kernel over cold rows
    threads: int
    reserve_bytes: int = 0  # not available to tensors: OS, the Python process


@dataclass(frozen=True)
class LinkSpec:
    pcie_bandwidth: float  # B/s, pinned host <-> device copies
    sync_seconds: float  # per split layer: send the FFN input, get the partial sum back, synchronise
    shared_memory: bool = False  # no discrete GPU: the "GPU" side runs on the CPU, over the same memory bus
    host_overhead_seconds: float = 0.0  # per split layer: host work and waiting outside both sides' kernels


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    gpu: GpuSpec
    cpu: CpuSpec
    link: LinkSpec
    dtype: str = "float16"  # default weight dtype on this machine
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        for what, v in (("gpu.bandwidth", self.gpu.bandwidth), ("cpu.bandwidth", self.cpu.bandwidth),
                        ("link.pcie_bandwidth", self.link.pcie_bandwidth)):
            if not v > 0:
                raise InputError(f"hardware spec {self.name!r}: {what} must be positive, got {v}",
                                 "fix the spec file or re-run `hotcold calibrate`")
        for what, v in (("link.sync_seconds", self.link.sync_seconds),
                        ("link.host_overhead_seconds", self.link.host_overhead_seconds)):
            if not v >= 0:
                raise InputError(f"hardware spec {self.name!r}: {what} must be 0 or more, got {v}",
                                 "fix the spec file or re-run `hotcold calibrate`")

    # ---- budgets --------------------------------------------------------------------------------
    @property
    def default_gpu_budget(self) -> int:
        return max(0, self.gpu.memory_bytes - self.gpu.reserve_bytes)

    @property
    def default_cpu_budget(self) -> int:
        return max(0, self.cpu.memory_bytes - self.cpu.reserve_bytes)

    # ---- I/O ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "hardware spec") -> HardwareSpec:
        if d.get("kind") != KIND:
            raise IncompatibleError(f"{where} is not a hardware spec (kind {d.get('kind')!r})",
                                    "pass a file written by `hotcold calibrate` or use --preset")
        if d.get("format_version") not in READS:
            raise IncompatibleError(f"{where} is hardware format version {d.get('format_version')}; "
                                    f"this hotcold reads {list(READS)}", "re-run `hotcold calibrate`")
        try:
            return cls(name=d["name"], gpu=GpuSpec(**d["gpu"]), cpu=CpuSpec(**d["cpu"]), link=LinkSpec(**d["link"]),
                       dtype=d.get("dtype", "float16"), source=d.get("source", ""), notes=dict(d.get("notes", {})),
                       measurements=dict(d.get("measurements", {})))
        except (KeyError, TypeError) as e:
            raise InputError(f"{where} is missing or has an unknown field ({e})",
                             "re-run `hotcold calibrate` or start from `hotcold calibrate --preset h200`") from None

    def save(self, path: str | Path) -> Path:
        from hotcold.artifacts import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> HardwareSpec:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"hardware spec {path} does not exist",
                             "write one with `hotcold calibrate --out hw.json` or use --preset "
                             "pc-high|pc-low|h200|h200-decode")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"hardware spec {path} is not valid JSON ({e})", "re-run `hotcold calibrate`") from None
        return cls.from_json(d, where=str(path))


# The sync latency measured on the H200 machine (32 KB round trip + stream sync) is the only measured
# value we have; the PC presets reuse it and say so.
_SYNC_H200 = 15.7e-6
_PAPER = "PowerInfer (arXiv 2312.12456) §8.1"

PRESETS: dict[str, HardwareSpec] = {
    "pc-high": HardwareSpec(
        name="pc-high",
        gpu=GpuSpec(name="NVIDIA RTX 4090", memory_bytes=24 * GiB, bandwidth=1008e9, reserve_bytes=1 * GiB),
        cpu=CpuSpec(name="Intel i9-13900K", memory_bytes=192 * 10**9, bandwidth=67.2e9, threads=8,
                    reserve_bytes=4 * GiB),
        link=LinkSpec(pcie_bandwidth=32e9, sync_seconds=_SYNC_H200),
        dtype="float16", source=f"preset: {_PAPER} PC-High",
        notes={"gpu.bandwidth": "datasheet (1008 GB/s GDDR6X)", "cpu.bandwidth": f"{_PAPER}: 67.2 GB/s DRAM",
               "link.pcie_bandwidth": "PCIe 4.0 x16, one direction (the paper's 64 GB/s counts both)",
               "link.sync_seconds": "not measured on this machine: the H200 machine's 32 KB round trip + sync",
               "reserve_bytes": "assumed: 1 GiB CUDA context and allocator slack, 4 GiB for the OS"}),
    "pc-low": HardwareSpec(
        name="pc-low",
        gpu=GpuSpec(name="NVIDIA RTX 2080 Ti", memory_bytes=11 * GiB, bandwidth=616e9, reserve_bytes=1 * GiB),
        cpu=CpuSpec(name="Intel i7-12700K", memory_bytes=64 * 10**9, bandwidth=38.4e9, threads=8,
                    reserve_bytes=4 * GiB),
        link=LinkSpec(pcie_bandwidth=16e9, sync_seconds=_SYNC_H200),
        dtype="float16", source=f"preset: {_PAPER} PC-Low",
        notes={"gpu.bandwidth": "datasheet (616 GB/s GDDR6)", "cpu.bandwidth": f"{_PAPER}: 38.4 GB/s DRAM",
               "link.pcie_bandwidth": "PCIe 3.0 x16, one direction",
               "link.sync_seconds": "not measured on this machine: the H200 machine's 32 KB round trip + sync",
               "reserve_bytes": "assumed: 1 GiB CUDA context and allocator slack, 4 GiB for the OS"}),
    "h200": HardwareSpec(
        name="h200",
        gpu=GpuSpec(name="NVIDIA H200", memory_bytes=150_109_880_320, bandwidth=4.3e12, sparse_bandwidth=2.4e12,
                    reserve_bytes=1 * GiB),
        cpu=CpuSpec(name="16 cores of the H200 host", memory_bytes=125 * GiB, bandwidth=97e9, threads=16,
                    reserve_bytes=4 * GiB),
        link=LinkSpec(pcie_bandwidth=55.2e9, sync_seconds=_SYNC_H200),
        dtype="float16", source="preset: measured on the project's H200 machine (issue 6)",
        notes={"gpu.memory_bytes": "measured: torch.cuda.mem_get_info total on the lent H200 (139.8 GiB)",
               "gpu.bandwidth": "measured: HBM 4.3 TB/s dense fp16 (hotcold calibrate: 3.94 TB/s with F.linear)",
               "gpu.sparse_bandwidth": "measured 2.4-3.5 TB/s reading 5-20% of rows; the lower end is used",
               "cpu.bandwidth": "measured: DRAM 97 GB/s with 16 threads (fp16 F.linear reaches 62-74 GB/s)",
               "link.pcie_bandwidth": "measured: pinned copies 55.2 GB/s",
               "link.sync_seconds": "measured: 32 KB round trip + sync 15.7 us (hotcold calibrate: 14.2 us)",
               "link.host_overhead_seconds": "0: device rates only; h200-decode adds what the engine measured",
               "reserve_bytes": "assumed: 1 GiB CUDA context and allocator slack, 4 GiB for the OS"}),
    # What hotcold's engine achieved on the same machine at batch-1 decode, 70B shape: the rates that predict
    # its ms/token (where they come from: docs/gpu.md, bench/results/hw_h200_fitted_run2.json).
    "h200-decode": HardwareSpec(
        name="h200-decode",
        gpu=GpuSpec(name="NVIDIA H200", memory_bytes=150_109_880_320, bandwidth=3.26e12, sparse_bandwidth=2.4e12,
                    reserve_bytes=1 * GiB),
        cpu=CpuSpec(name="16 cores of the H200 host", memory_bytes=125 * GiB, bandwidth=76e9, threads=16,
                    reserve_bytes=4 * GiB),
        link=LinkSpec(pcie_bandwidth=55.2e9, sync_seconds=_SYNC_H200, host_overhead_seconds=274e-6),
        dtype="float16", source="preset: fitted to hotcold's batch-1 decode on the project's H200 machine (issue 6)",
        notes={"gpu.memory_bytes": "measured: torch.cuda.mem_get_info total on the lent H200 (139.8 GiB)",
               "gpu.bandwidth": "fitted: all-GPU decode achieved 3.26 TB/s end to end (cuBLAS GEMV alone 3.78)",
               "gpu.sparse_bandwidth": "measured 2.4-3.5 TB/s reading 5-20% of rows; the lower end is used",
               "cpu.bandwidth": "fitted: the sparse cold-row kernel, 16 cores, 76 GB/s (61-81 across machines)",
               "link.pcie_bandwidth": "measured: pinned copies 55.2 GB/s",
               "link.sync_seconds": "measured: 32 KB round trip + sync 15.7 us (as h200)",
               "link.host_overhead_seconds": "fitted: 290 us per split layer not explained by the rates, less "
                                             "the 15.7 us sync (run 3 of the same bench: 220 - 15.7 = 204 us)",
               "reserve_bytes": "assumed: 1 GiB CUDA context and allocator slack, 4 GiB for the OS"}),
}


def preset(name: str) -> HardwareSpec:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise InputError(f"unknown hardware preset {name!r}",
                         f"use one of: {', '.join(PRESETS)}, or --hardware hw.json from `hotcold calibrate`") from None


def resolve(preset_name: str | None = None, path: str | Path | None = None) -> HardwareSpec:
    """The spec named by exactly one of --preset / --hardware."""
    if preset_name and path:
        raise InputError("both --preset and --hardware were given", "pass one of them")
    if path:
        return HardwareSpec.load(path)
    if preset_name:
        return preset(preset_name)
    raise InputError("no hardware given", "pass --preset pc-high|pc-low|h200|h200-decode or --hardware hw.json")


# ---- calibration ------------------------------------------------------------------------------
def _total_ram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def calibrate(dtype: str | None = None, seconds: float = 40.0, threads: int | None = None,
              log: Callable[[str], None] = lambda s: None) -> HardwareSpec:
    """Measure this machine: CPU read and matrix-vector bandwidth always; GPU, PCIe and sync with CUDA.

    Each measurement is a median over repeats after a warm-up; the whole run stays under `seconds`
    (a measurement that would overrun keeps the repeats it has). Without CUDA the spec says so
    (`link.shared_memory`): the runtime's "GPU" side then runs on the CPU over the same memory.
    Measuring needs torch; the rest of the solver does not.
    """
    try:
        import torch
        import torch.nn.functional as F
    except ModuleNotFoundError:
        raise InputError("hotcold calibrate measures with torch, which is not installed here",
                         "pip install torch, or take a preset (hotcold calibrate --preset NAME --out FILE) "
                         "and edit its bandwidths") from None

    start = time.perf_counter()
    deadline = start + seconds
    cuda = torch.cuda.is_available()
    dtype = canonical_dtype(dtype or ("float16" if cuda else "float32"))
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"calibrate measures float dtypes, not {dtype}", "pass --dtype float16|bfloat16|float32")
    tdtype = getattr(torch, dtype)
    n_threads = threads or os.cpu_count() or 1
    torch.set_num_threads(n_threads)
    ram = _total_ram()
    m: dict[str, Any] = {"host": platform.node(), "cpu_threads": n_threads, "dtype": dtype,
                         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    # CPU: a working set well beyond the caches: 1 GiB (at most 1/16 of RAM); a short run (`seconds`
    # below 32) shrinks it to `seconds` × 32 MiB, never below 64 MiB.
    dim = 4096
    ws = min(GiB, ram // 16 or GiB, max(64 * 2**20, int(seconds * 32 * 2**20)))
    rows = max(dim, ws // (dim * torch.finfo(tdtype).bits // 8))
    w = torch.full((rows, dim), 0.5, dtype=tdtype)  # values do not matter for bandwidth; full() is fast
    x = torch.full((1, dim), 0.5, dtype=tdtype)
    nbytes = w.numel() * w.element_size()
    log(f"CPU: {n_threads} threads, {nbytes / GiB:.2f} GiB working set")
    t_read = median_time(lambda: w.sum(), 5, deadline=deadline)
    t_lin = median_time(lambda: F.linear(x, w), 5, deadline=deadline)
    m["cpu_read_GBps"] = nbytes / t_read / 1e9
    m["cpu_linear_GBps"] = nbytes / t_lin / 1e9
    log(f"CPU: read {m['cpu_read_GBps']:.1f} GB/s, {dtype} matrix-vector {m['cpu_linear_GBps']:.1f} GB/s")
    cpu_bw = m["cpu_linear_GBps"] * 1e9  # what the runtime's cold-neuron kernel does
    w = None  # free the working set before the GPU measurements

    cpu = CpuSpec(name=platform.processor() or platform.machine(), memory_bytes=ram, bandwidth=cpu_bw,
                  threads=n_threads, reserve_bytes=min(4 * GiB, ram // 8))
    notes = {"cpu.bandwidth": f"measured: {dtype} F.linear over {nbytes / GiB:.2f} GiB, {n_threads} threads",
             "cpu.reserve_bytes": "assumed: min(4 GiB, RAM/8) for the OS and the Python process"}
    if not cuda:
        # The "GPU" side is the CPU: same bandwidth, same memory, no transfer or sync.
        gpu = GpuSpec(name="none (GPU side runs on the CPU)", memory_bytes=ram, bandwidth=cpu_bw,
                      reserve_bytes=cpu.reserve_bytes)
        link = LinkSpec(pcie_bandwidth=m["cpu_read_GBps"] * 1e9, sync_seconds=0.0, shared_memory=True)
        notes["link"] = "no CUDA: GPU and CPU sides share one memory bus; no sync"
    else:
        dev = torch.device("cuda")
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(dev)
        m["gpu_name"], m["gpu_total_bytes"], m["gpu_free_bytes"] = props.name, total, free
        sync = torch.cuda.synchronize
        gw = torch.full((8 * 8192, 8192), 0.5, device=dev, dtype=tdtype)  # 1 GiB in fp16
        gx = torch.full((1, 8192), 0.5, device=dev, dtype=tdtype)
        gbytes = gw.numel() * gw.element_size()
        t = median_time(lambda: F.linear(gx, gw), 20, sync, deadline=deadline)
        m["gpu_linear_GBps"] = gbytes / t / 1e9
        sparse = {}
        for frac in (0.05, 0.1, 0.2):
            idx = torch.randperm(gw.shape[0], device=dev)[: int(gw.shape[0] * frac)].sort().values
            t = median_time(lambda: F.linear(gx, gw.index_select(0, idx)), 20, sync, deadline=deadline)
            sparse[str(frac)] = idx.numel() * gw.shape[1] * gw.element_size() / t / 1e9
        m["gpu_sparse_GBps"] = sparse
        gw = None
        host = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
        devbuf = torch.empty_like(host, device=dev)
        t_h2d = median_time(lambda: devbuf.copy_(host, non_blocking=True), 10, sync, deadline=deadline)
        t_d2h = median_time(lambda: host.copy_(devbuf, non_blocking=True), 10, sync, deadline=deadline)
        m["pcie_h2d_GBps"], m["pcie_d2h_GBps"] = host.numel() / t_h2d / 1e9, host.numel() / t_d2h / 1e9
        small_h = torch.empty(32 * 1024, dtype=torch.uint8).pin_memory()
        small_d = torch.empty_like(small_h, device=dev)

        def round_trip() -> None:
            small_d.copy_(small_h, non_blocking=True)
            small_h.copy_(small_d, non_blocking=True)
            sync()

        m["sync_round_trip_us"] = median_time(round_trip, 200, deadline=deadline) * 1e6
        gpu = GpuSpec(name=props.name, memory_bytes=int(total), bandwidth=m["gpu_linear_GBps"] * 1e9,
                      sparse_bandwidth=min(sparse.values()) * 1e9, reserve_bytes=int(total - free))
        link = LinkSpec(pcie_bandwidth=min(m["pcie_h2d_GBps"], m["pcie_d2h_GBps"]) * 1e9,
                        sync_seconds=m["sync_round_trip_us"] * 1e-6)
        notes.update({"gpu.bandwidth": f"measured: {dtype} F.linear over 1 GiB",
                      "gpu.sparse_bandwidth": "measured: index_select + F.linear of 5/10/20% of rows, slowest",
                      "gpu.reserve_bytes": "measured: total - free after CUDA initialisation",
                      "link.pcie_bandwidth": "measured: pinned 256 MiB copies, slower direction",
                      "link.sync_seconds": "measured: 32 KB host->device->host round trip + synchronize",
                      "link.host_overhead_seconds": "not measured by calibrate (it needs the engine): 0; "
                                                    "fit it from a `hotcold bench` run"})
    m["seconds"] = time.perf_counter() - start
    return HardwareSpec(name=f"calibrated:{platform.node() or 'this-machine'}", gpu=gpu, cpu=cpu, link=link,
                        dtype=dtype, source=f"measured by hotcold calibrate on {m['host']} at {m['date']}",
                        notes=notes, measurements=m)
