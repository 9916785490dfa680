"""`threshold` mode quality on SmolLM2 at 50% per-layer sparsity: next-token agreement with dense on MBPP.

    python bench/bench_runtime_quality.py [--prompts 100] [--sparsity 0.5] [--profile-prompts 24]
                                          [--greedy-tokens 64] [--out bench/results/runtime_quality.json]

Thresholds t_l come from a teacher-forced profile of MBPP *train* prompts (decode-phase |a| histograms,
product rule); agreement is measured on MBPP *test* prompts, with every neuron under the rule (all-on-CPU
bundle: nothing is computed densely). Three ways of counting, all reported:
  runtime    what `hotcold run` computes: the prompt prefilled densely (--prefill dense, the default), then
             every reference-code position through the decode path (each token its own active set),
             teacher-forced; agreement of the argmax at each of those positions (the headline number);
  all_sparse the prompt computed sparsely too (--prefill sparse): stricter than the runtime;
  greedy     as `runtime`, but over dense's own greedy continuation (what generation feeds back) instead of
             the reference code.
The realized active fraction is measured on the decode-path tokens only (the definition: 50% of each
layer's neurons inactive on average).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchkit import REPO, log, train_profile  # bench/ is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=str(REPO / "bench" / ".cache" / "runtime"))
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--profile-prompts", type=int, default=24)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "runtime_quality.json"))
    args = ap.parse_args()

    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.dense import DenseModel
    from hotcold.model.generate import generate
    from hotcold.model.registry import load_source
    from hotcold.quality.metrics import next_token_agreement
    from hotcold.runtime import load
    from hotcold.solver.placement import Placement
    from hotcold.workloads import load_dataset, teacher_forced

    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(args.model)
    cfg = src.config
    prof, order = train_profile(src, work, args.profile_prompts)
    placement = Placement(manifest={"model": {"config": cfg.to_json(), "fingerprint": src.fingerprint}},
                          order=order, n_hot=np.zeros(cfg.n_layers, np.int32))
    bundle = work / f"bundle-quality-all-cpu-s{args.sparsity}"
    export_bundle(src, placement, bundle, profile=prof, options=ExportOptions(sparsity=args.sparsity))

    dense = DenseModel.from_source(src, max_len=2048)
    prefill = load(bundle, mode="exact", max_len=2048, device="cpu", measure=False)  # dense prompt, same weights
    sparse = load(bundle, mode="threshold", max_len=2048, device="cpu")  # its stats: decode-path tokens only
    allsp = load(bundle, mode="threshold", prefill="sparse", max_len=2048, device="cpu", measure=False)
    tok = sparse.bundle.tokenizer
    pairs = {k: ([], []) for k in ("runtime", "all_sparse", "greedy")}
    per_prompt = []

    def decode_path(p: list[int], cont: list[int]) -> torch.Tensor:
        """Logits predicting cont[0..] : the last prompt position (dense prefill), then cont[:-1] sparse."""
        cache = sparse.new_cache(1, len(p) + len(cont))
        first = prefill.forward(torch.tensor([p]), 0, cache)[0, -1:]
        if len(cont) == 1:
            return first
        return torch.cat([first, sparse.forward(torch.tensor([cont[:-1]]), len(p), cache, sparse=True)[0]])

    tasks = load_dataset("mbpp", "test", limit=args.prompts).tasks
    with torch.inference_mode():
        for i, task in enumerate(tasks):
            pt, ct = teacher_forced(task, "chat", tok.render_chat)
            p, c = tok.encode(pt), tok.encode(ct, add_bos=False)
            x = torch.tensor([p + c])
            sl = slice(len(p) - 1, len(p) + len(c) - 1)
            d = dense.forward(x)[0, sl]
            rt = decode_path(p, c)
            pairs["runtime"][0].append(d)
            pairs["runtime"][1].append(rt)
            pairs["all_sparse"][0].append(d)
            pairs["all_sparse"][1].append(allsp.forward(x)[0, sl])
            g = generate(dense, p, args.greedy_tokens, eos_ids=tok.eos_ids).new_ids
            y = torch.tensor([p + g])
            pairs["greedy"][0].append(dense.forward(y)[0, len(p) - 1:len(p) + len(g) - 1])
            pairs["greedy"][1].append(decode_path(p, g))
            per_prompt.append({"task": task.id, "positions": len(c),
                               "agreement_runtime": next_token_agreement(d, rt)})
            if (i + 1) % 10 == 0:
                log(f"{i + 1}/{len(tasks)}: runtime agreement so far "
                    f"{next_token_agreement(torch.cat(pairs['runtime'][0]), torch.cat(pairs['runtime'][1])):.4f}")
    agreement = {k: next_token_agreement(torch.cat(a), torch.cat(b)) for k, (a, b) in pairs.items()}
    rep = sparse.report()["prefill"]  # multi-token forwards with sparse=True: the decode path's tokens
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "settings": vars(args), "bundle": str(bundle),
        "thresholds": {"rule": sparse.rule, "source": f"MBPP train[:{args.profile_prompts}] decode-phase histograms",
                       "values": sparse.thresholds},
        "agreement": agreement,
        "positions": {k: int(sum(t.shape[0] for t in a)) for k, (a, b) in pairs.items()},
        "decode_path_active_fraction": rep["active_fraction"],
        "decode_path_active_fraction_per_layer": [r["active_fraction"] for r in rep["layers"]],
        "per_prompt": per_prompt, "seconds": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"agreement {({k: round(v, 4) for k, v in agreement.items()})}, decode-path active fraction "
        f"{rep['active_fraction']:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
