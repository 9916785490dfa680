"""Dense decode speed of hotcold's reference model vs transformers on the same GGUF, in one run.

    python bench/bench_dense.py [--model smollm2-135m] [--context 64] [--new-tokens 64] [--out bench/results/dense.json]

Warm-up excluded; greedy decode at batch 1 on CPU, fp32; context = prompt length before decoding.
Reports tokens/s for both and their ratio, plus achieved weight-streaming GB/s for ours.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def decode_rate_ours(model, ids: list[int], n: int) -> float:
    from hotcold.model.generate import generate

    generate(model, ids, 4)  # warm-up
    g = generate(model, ids, n)
    return g.decode_tokens_per_s


def decode_rate_transformers(hf, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(x))
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(x))
        t1 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
        t2 = time.perf_counter()
    # subtract the prefill + first token, as ours does
    return (n - 1) / ((t2 - t1) - (t1 - t0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/dense.json")
    a = ap.parse_args()

    from hotcold.model.dense import DenseModel
    from hotcold.model.registry import load_source

    src = load_source(a.model)
    ours = DenseModel.from_source(src, max_len=a.context + a.new_tokens + 8)
    ids = list(torch.randint(100, src.config.vocab_size, (a.context,), generator=torch.Generator().manual_seed(0)).tolist())
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                           torch_dtype=torch.float32).eval()
    rows = []
    for _ in range(a.repeats):  # interleaved, so machine noise hits both alike
        rows.append((decode_rate_ours(ours, ids, a.new_tokens), decode_rate_transformers(hf, ids, a.new_tokens)))
    ours_best = max(r[0] for r in rows)
    hf_best = max(r[1] for r in rows)
    weight_bytes = sum(t.numel() * t.element_size() for lw in ours.layers for t in lw.__dict__.values() if t is not None)
    weight_bytes += ours.lm_head.numel() * ours.lm_head.element_size()
    result = {
        "benchmark": "dense decode, batch 1, fp32, CPU",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": src.description, "context": a.context, "new_tokens": a.new_tokens,
        "hotcold_decode_tokens_per_s": round(ours_best, 2),
        "transformers_decode_tokens_per_s": round(hf_best, 2),
        "ratio_hotcold_over_transformers": round(ours_best / hf_best, 3),
        "hotcold_achieved_GBps": round(weight_bytes * ours_best / 1e9, 2),
        "runs": [{"hotcold": round(o, 2), "transformers": round(h, 2)} for o, h in rows],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
