"""Probe: the GPU side's q4 Triton kernels (hotcold.runtime.qtriton) at LLaMA-2-70B's shapes, each config
tuned on the real shape and every time taken from a CUDA graph's replay (as the engine runs them); the fp16
cuBLAS GEMV of the same matrix size as the rate baseline. Checks each kernel against its dequantized
matrix. Writes $OUT/q4gemv.json.
    PYTHONPATH=. python3 bench/device/q4probe/gemv.py"""
import json
import os
from pathlib import Path

import torch

from hotcold.quant import dequantize, parse_format, random_qtensor
from hotcold.runtime import qtriton

out = Path(os.environ.get("OUT", "."))
dev = torch.device("cuda")
fmt = parse_format("q4")
D, FF, KV, VOCAB = 8192, 28672, 1024, 32000


def timed(fn, reps=50) -> float:
    """GPU ms per call, replayed from a CUDA graph as the engine runs it (plain launches from Python time
    the launcher, not the kernel)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ops": []}
x = torch.randn(D, device=dev)
cases = [("qgemv", "wq/wo", D, D), ("qgemv", "wk/wv", KV, D), ("qgemv", "output", VOCAB, D),
         ("qgate_up", "gate+up all hot", 2 * FF, D), ("qgate_up", "gate+up 48% hot", 2 * 13762, D),
         ("qvecmat", "down all hot", FF, D)]
for op, name, N, K in cases:
    w = random_qtensor(N, K, fmt, seed=1, device=dev)
    W = dequantize(w)
    row = {"op": op, "what": name, "shape": [N, K], "bytes": int(w.packed.numel())}
    ops = qtriton.QGpuOps(dev)
    if op == "qgemv":
        y = torch.empty(N, device=dev)
        fn = lambda: ops.qgemv(w, y, x=x)  # noqa: E731
        ref = W @ x
    elif op == "qgate_up":
        k = N // 2
        y = torch.empty(k, device=dev)
        fn = lambda: ops.qgate_up(w, y, x=x)  # noqa: E731
        g, u = (W.view(k, 2, K) @ x).unbind(1)
        ref = torch.nn.functional.silu(g) * u
    else:
        a = torch.randn(N, device=dev)
        y = torch.zeros(K, device=dev)
        fn = lambda: (y.zero_(), ops.qvecmat_add(a, w, y))  # noqa: E731
        ref = a @ W
    fn()
    torch.cuda.synchronize()
    err = float((y - ref).abs().max() / ref.abs().max())
    ms = timed(fn)
    row["q4"] = {"ms": round(ms, 4), "GBps": round(row["bytes"] / ms / 1e6, 1), "rel_err": err,
                 "tuning": ops.tuning_log}
    wf = torch.randn(N if op != "qvecmat" else K, K if op != "qvecmat" else N, device=dev, dtype=torch.float16)
    xf = torch.randn(wf.shape[1], device=dev, dtype=torch.float16)
    ms16 = timed(lambda: torch.mv(wf, xf))
    row["fp16_cublas"] = {"ms": round(ms16, 4), "GBps": round(wf.numel() * 2 / ms16 / 1e6, 1)}
    print(f"{op:9s} {name:18s} {N}x{K}: q4 {row['q4']['ms']:.4f} ms {row['q4']['GBps']:.0f} GB/s, "
          f"fp16 cuBLAS {row['fp16_cublas']['GBps']:.0f} GB/s; err {row['q4']['rel_err']:.1e}", flush=True)
    for t in row["q4"]["tuning"]:
        top = sorted(t["ms"].items(), key=lambda kv: kv[1])[:4]
        print(f"    tuned {t['op']} {t['shape'][:2]}: " + ", ".join(f"{c} {m * 1e3:.1f}us" for c, m in top), flush=True)
    res["ops"].append(row)
    del w, W, wf
    torch.cuda.empty_cache()
(out / "q4gemv.json").write_text(json.dumps(res, indent=1) + "\n")
