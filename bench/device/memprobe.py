"""Where a 70B-shape study cell's GPU memory goes: one child of `hotcold study --scale` (relu, fixed, one
round) with torch's counters at each stage, then every live CUDA tensor grouped by shape. Writes $OUT/memprobe.json.
    python bench/device/memprobe.py [BUDGET]"""
import gc, json, os, subprocess, sys, time
from collections import Counter
from pathlib import Path

import torch

from hotcold.memory import parse_bytes
from hotcold.study import scale

out = Path(os.environ.get("OUT", "/tmp"))
budget = sys.argv[1] if len(sys.argv) > 1 else "24GiB"
spec = {"scenario": "relu", "budget": budget, "shape": os.environ.get("SHAPE", "llama2-70b"), "layers": None, "quant": "q4", "ctx_len": 512,
        "rank": 128, "stats": "bench/.cache/study70b/stats", "slack": parse_bytes("0.75GiB", "slack"),
        "policies": ["fixed"], "tokens": 8, "warm": 4, "rounds": 1, "relu_density": 0.10, "seed": 0, "device": os.environ.get("DEVICE", "cuda"),
        "cpu_threads": None, "time_limit": 20.0, "hw": None, "selected_over_active": 1.5,
        "migrate_s_per_neuron": None, "result": str(out / "memprobe_cell.json")}

# the child's code, in this process, with a tensor census after the build
import hotcold.runtime.build as build
census = {}
real = build.random_quantized_model


def wrapped(*a, **k):
    eng = real(*a, **k)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seen, groups, total = set(), Counter(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda:
                st = o.untyped_storage()
                key = st.data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                n = st.nbytes()
                total += n
                groups[(tuple(o.shape) if o.dim() <= 3 else o.dim(), str(o.dtype))] += n
        except Exception:
            pass
    census["live_tensor_bytes"] = total
    census["allocated"] = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    census["top"] = [(str(k), v) for k, v in groups.most_common(25)]
    census["account"] = eng.account.to_json() if getattr(eng, "account", None) else None
    return eng


build.random_quantized_model = wrapped
with scale.NvSampler() as nv:
    res = scale.child(spec)
res["nvidia_smi_peak_mib"] = nv.peak
res["census"] = census
(out / "memprobe.json").write_text(json.dumps({k: res[k] for k in ("room_bytes", "budget_note", "cuda_context_bytes",
                                                                  "neurons_that_fit", "gpu_memory", "torch_max_reserved_bytes",
                                                                  "nvidia_smi_peak_mib", "census")}, indent=1, default=str))
G = 2 ** 30
print("room", res["room_bytes"] / G, "peak smi GiB", (nv.peak or 0) / 1024, "max reserved", res["torch_max_reserved_bytes"] / G)
for st in res["gpu_memory"]:
    for k, v in st.items():
        print(k, v if not isinstance(v, dict) else {kk: round(vv / G, 3) for kk, vv in v.items()})
print("live", census["live_tensor_bytes"] / G, "alloc", census["allocated"] / G)
for k, v in census["top"]:
    print(f"  {v / G:8.3f} GiB  {k}")
