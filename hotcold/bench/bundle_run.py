"""`hotcold bench --bundle DIR`: time an exported Bundle's model with the benchmark's own timing loop.

The same model object `hotcold run` builds (hotcold.runtime.build.from_bundle, every check of the one
Bundle reader), decoded by `run_engine` (warm-up excluded, argmax fed back on the device, the device
synchronised every token), so `hotcold run --json` on the same Bundle can be checked against it. Also
measured: the GPU bytes the model holds after loading (torch.cuda.memory_allocated) against the memory
account the solver and exporter used for its placement (hotcold.memory, at the Bundle's context length).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable


def bench_bundle(path: str | Path, *, mode: str = "threshold", tokens: int = 64, warm: int = 8,
                 device: str = "auto", verify: str = "full", max_len: int | None = None, hardware: str = "h200",
                 log: Callable[[str], None] = print, **model_kw: Any) -> dict[str, Any]:
    import torch

    from hotcold.bundle import Bundle
    from hotcold.bench.harness import free_cuda
    from hotcold.bench.runs import run_engine
    from hotcold.runtime.build import from_bundle, resolve_device
    from hotcold.solver.hardware import resolve

    dev = resolve_device(device)
    t0 = time.perf_counter()
    b = Bundle.load(path, verify=verify)
    ctx = int(max_len or b.manifest.get("ctx_len") or b.config.max_seq_len)
    free_cuda()
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    m = from_bundle(b, mode=mode, device=dev, max_len=ctx, **model_kw)
    held = (torch.cuda.memory_allocated(dev) - base) if dev.type == "cuda" else None
    load_s = time.perf_counter() - t0
    log(f"loaded {path} in {load_s:.1f} s ({mode} mode, context {ctx})")
    r = run_engine(m, tokens, warm)
    acct = m.account
    hw = resolve(path=hardware) if str(hardware).endswith(".json") else resolve(preset_name=hardware)
    r.update({"bundle": str(path), "mode": mode, "rule": m.rule, "ctx_len": ctx, "load_seconds": load_s,
              "n_hot": [g.n_hot for g in m.gl], "n_ff": b.config.n_ff, "device": m.facts(),
              "memory": m.memory(), "account_gpu_bytes": int(acct.gpu_total), "account": acct.to_json(),
              "placement_modelled_ms_per_token": (b.manifest.get("placement", {}).get("summary") or {}).get(
                  "modelled_ms_per_token")})
    if held is not None:
        r["gpu_bytes_after_load"] = int(held)
        r["gpu_bytes_vs_account"] = held / acct.gpu_total - 1 if acct.gpu_total else None
    # the bandwidth floor of what this run read: GPU-side bytes at the preset's HBM rate plus the bytes the
    # cold kernel touched at its DRAM rate (the sides serial: attention precedes the split)
    r["floor_ms"] = (m.gpu_bytes_per_token() / hw.gpu.bandwidth + r["cpu_MB_per_token"] * 1e6 / hw.cpu.bandwidth) * 1e3
    r["ratio_to_floor"] = r["ms_per_token"] / r["floor_ms"]
    r["hardware_for_floor"] = hw.name
    log(f"{path}: {r['ms_per_token']:.2f} ms/token, {r['ratio_to_floor']:.2f}x its floor; GPU held "
        f"{'n/a' if held is None else f'{held / 1e9:.3f} GB'} vs account {acct.gpu_total / 1e9:.3f} GB")
    del m
    free_cuda()
    return r
