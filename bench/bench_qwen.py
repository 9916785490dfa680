"""Qwen2.5-Coder against transformers loading the same GGUF: greedy parity and dense decode speed, one run.

    python bench/bench_qwen.py --model qwen2.5-coder-1.5b [--prompts 5] [--new-tokens 64] [--repeats 3] \
        [--rounds 3] [--no-parity] [--out bench/results/qwen15_parity_speed.json]

Parity: the first --new-tokens greedy tokens (EOS ignored, so every prompt yields that many) of ours and
of transformers on --prompts MBPP test prompts (ids 11, 12, ...: the chat template around the pass@1
user turn), and the max |logit difference| over every position of prompt + continuation, fp32.

Speed: greedy decode at batch 1, fp32, the same thread count for both, warm-up excluded, on the first
prompt. Both models of the 1.5B in fp32 take ~12 GB; so that the machine's other users keep their
memory, only one model is resident at a time: ours, transformers, ours, ... (--rounds loads, starting
and ending with ours), each timed --repeats times, so a change in the machine's load shows in both;
the ratio is best over best, and per round pair (each transformers round against the mean of the ours
rounds on either side of it). Weights are
dequantized to fp32 by both (the GGUF is Q4_K/Q6_K or Q5_0/Q8_0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: the cores are shared

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ours_decode_rate(model, ids: list[int], n: int) -> float:
    from hotcold.model.generate import generate

    generate(model, ids, 4)  # warm-up
    return generate(model, ids, n).decode_tokens_per_s


def hf_decode_rate(hf, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    kw = dict(do_sample=False, attention_mask=torch.ones_like(x), eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    return (n - 1) / ((t2 - t1) - (t1 - t0))  # prefill + first token subtracted, as ours reports


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="model loads for the speed part, odd: ours, transformers, ours, ...")
    ap.add_argument("--no-parity", action="store_true", help="only the speed part")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    from hotcold.model.dense import DenseModel
    from hotcold.model.generate import generate
    from hotcold.model.registry import load_source
    from hotcold.quality.passk import prompt_ids
    from hotcold.workloads import load_dataset

    src = load_source(a.model)
    tok = src.tokenizer()
    tasks = list(load_dataset("mbpp", "test", limit=a.prompts))
    prompts = [prompt_ids(tok, t) for t in tasks]
    max_len = max(map(len, prompts)) + max(a.new_tokens, a.speed_tokens) + 8

    def load_ours():
        t0 = time.perf_counter()
        m = DenseModel.from_source(src, max_len=max_len)
        log(f"ours loaded in {time.perf_counter() - t0:.0f} s")
        return m

    def load_hf():
        t0 = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                               dtype=torch.float32).eval()
        log(f"transformers loaded in {time.perf_counter() - t0:.0f} s")
        return hf

    rows = []
    if not a.no_parity:
        m = load_ours()
        ours_tokens, ours_logits = [], []
        for ids in prompts:
            g = generate(m, ids, a.new_tokens)  # no eos: exactly new_tokens tokens
            ours_tokens.append(g.new_ids)
            ours_logits.append(m.forward(torch.tensor([ids + g.new_ids]))[0])
        log("ours: parity continuations done")
        del m
        gc.collect()
        hf = load_hf()
        for task, ids, mine, lm in zip(tasks, prompts, ours_tokens, ours_logits):
            x = torch.tensor([ids])
            with torch.no_grad():
                # no min_new_tokens: it works by masking EOS, which would change the greedy choice
                ref = hf.generate(x, max_new_tokens=a.new_tokens, do_sample=False, attention_mask=torch.ones_like(x),
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
                ref_logits = hf(torch.tensor([ids + mine])).logits[0]
            same = next((i for i, (p, q) in enumerate(zip(mine, ref)) if p != q), len(mine))
            rows.append({"task": task.id, "prompt_tokens": len(ids), "new_tokens": [len(mine), len(ref)],
                         "greedy_tokens_equal": mine == ref, "first_difference_at": None if mine == ref else same,
                         "max_abs_logit_diff": float((lm - ref_logits).abs().max())})
        log(f"parity {rows}")
        del hf, ours_logits
        gc.collect()

    rounds: list[tuple[str, list[float]]] = []
    for r in range(a.rounds | 1):
        which = "hotcold" if r % 2 == 0 else "transformers"
        m = load_ours() if which == "hotcold" else load_hf()
        rate = ours_decode_rate if which == "hotcold" else hf_decode_rate
        rounds.append((which, [rate(m, prompts[0], a.speed_tokens) for _ in range(a.repeats)]))
        log(f"{which} decode {rounds[-1][1]}")
        del m
        gc.collect()
    speed_ours = [x for w, xs in rounds if w == "hotcold" for x in xs]
    speed_hf = [x for w, xs in rounds if w == "transformers" for x in xs]
    pair_ratios = [statistics.mean(rounds[i - 1][1] + rounds[i + 1][1]) / statistics.mean(rounds[i][1])
                   for i in range(1, len(rounds) - 1, 2)]

    result = {
        "benchmark": "Qwen2.5-Coder vs transformers on the same GGUF: greedy parity (fp32) and dense decode at batch 1",
        "command": " ".join(["python", *sys.argv]),
        "model": a.model, "source": src.description, "fingerprint": src.fingerprint,
        "parity": None if a.no_parity else {
            "prompts": rows, "new_tokens": a.new_tokens, "all_greedy_equal": all(r["greedy_tokens_equal"] for r in rows),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows), "dtype": "fp32"},
        "speed": {"context_tokens": len(prompts[0]), "new_tokens": a.speed_tokens,
                  "rounds": [{"engine": w, "decode_tokens_per_s": [round(x, 3) for x in xs]} for w, xs in rounds],
                  "note": "one model resident at a time, loads alternating; tokens/s after a warm-up, prefill excluded",
                  "ratio_best_over_best": round(max(speed_ours) / max(speed_hf), 3),
                  "ratio_per_round_pair": [round(x, 3) for x in pair_ratios]},
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    text = json.dumps(result, indent=2) + "\n"
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
