"""Two pass@1 runs on the same tasks, compared task by task (`hotcold eval pass1` JSONs).

    python bench/pass1_paired.py DENSE.json SPARSE.json [--json]
    python bench/pass1_paired.py D100.json,D400.json S100.json,S400.json      (slices of one split, joined)

Prints both pass rates on the tasks they share, the discordant pairs (solved by one run only), the exact
two-sided McNemar p-value (binomial on the discordant pairs) and a 95% interval for the difference of
the two rates (Newcombe's method 10 for paired proportions, from the Wilson intervals). Greedy decoding
makes each run deterministic, so the tasks are the only source of variation here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scipy.stats import binomtest


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def paired(a: dict[str, bool], b: dict[str, bool]) -> dict:
    ids = sorted(set(a) & set(b))
    if not ids:
        sys.exit("error: the two runs share no task: run them on the same --dataset/--split/--offset/--limit")
    n = len(ids)
    ka, kb = sum(a[i] for i in ids), sum(b[i] for i in ids)
    only_a = [i for i in ids if a[i] and not b[i]]
    only_b = [i for i in ids if b[i] and not a[i]]
    both = sum(a[i] and b[i] for i in ids)
    neither = n - both - len(only_a) - len(only_b)
    d = len(only_a) + len(only_b)
    p = binomtest(len(only_b), d, 0.5).pvalue if d else 1.0
    pa, pb = ka / n, kb / n
    la, ua = wilson(ka, n)
    lb, ub = wilson(kb, n)
    # Newcombe (1998) method 10: the Wilson limits with the phi correlation of the pairs
    den = (both + len(only_a)) * (neither + len(only_b)) * (both + len(only_b)) * (neither + len(only_a))
    phi = ((both * neither - len(only_a) * len(only_b)) / math.sqrt(den)) if den > 0 else 0.0
    diff = pb - pa
    dl = math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    du = math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return {"tasks": n, "a_passed": ka, "b_passed": kb, "a_rate": pa, "b_rate": pb, "both": both, "neither": neither,
            "only_a": only_a, "only_b": only_b, "mcnemar_exact_p": p,
            "difference_b_minus_a": diff, "difference_95": [diff - dl, diff + du]}


def load(paths: str) -> dict[str, bool]:
    """One run, or a comma-separated list of runs over disjoint slices of one split (joined task by task)."""
    out: dict[str, bool] = {}
    for path in paths.split(","):
        try:
            d = json.loads(Path(path).read_text())
            part = {t["id"]: bool(t["passed"]) for t in d["tasks"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: {path} is not a pass@1 result ({type(e).__name__}: {e}): pass the --out of `hotcold eval pass1`")
        if set(part) & set(out):
            sys.exit(f"error: {path} repeats tasks of an earlier file in the same list: join runs over disjoint slices only")
        out.update(part)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = paired(load(args.a), load(args.b))
    if args.json:
        print(json.dumps(r, indent=1))
        return
    lo, hi = r["difference_95"]
    print(f"{r['tasks']} shared tasks: {args.a} {r['a_passed']} ({100 * r['a_rate']:.1f}%), {args.b} {r['b_passed']} "
          f"({100 * r['b_rate']:.1f}%); solved by the first only {len(r['only_a'])}, by the second only "
          f"{len(r['only_b'])}; McNemar exact p = {r['mcnemar_exact_p']:.3f}; difference {100 * r['difference_b_minus_a']:+.1f} "
          f"points (95% {100 * lo:+.1f} … {100 * hi:+.1f})")


if __name__ == "__main__":
    main()
