"""The study's report: results.csv, report.md (with PNG plots beside it) and a self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

# (key, short header for the terminal, full header for the reports)
COLUMNS = [
    ("name", "run", "run (policy@budget)"), ("engine", "engine", "decoded by"), ("gpu_bytes", "GPU MiB", "GPU memory (MiB)"),
    ("n_hot_fraction", "hot", "neurons on GPU"), ("modelled_ms_per_token", "model ms", "modelled ms/token"),
    ("measured_decode_ms_per_token", "meas ms", "measured ms/token (decode)"),
    ("gpu_share_of_active", "GPU act", "GPU share of activated neurons"),
    ("skipped_fraction", "skipped", "FFN neurons skipped per token"),
    ("agreement", "agree", "next-token agreement"), ("kl", "KL", "KL (nats)"), ("perplexity", "ppl", "perplexity"),
    ("pass_at_1", "pass@1", "pass@1"),
]


def fmt(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if key == "gpu_bytes":
        return f"{v / 2**20:.1f}"
    if key in ("n_hot_fraction", "gpu_share_of_active", "pass_at_1", "skipped_fraction"):
        return f"{100 * v:.1f}%"
    if key in ("agreement",):
        return f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def visible_columns(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """COLUMNS without those no run has a value for (pass@1 when not asked for), and without the engine
    column when every run used the runtime."""
    runs = results["runs"]
    return [c for c in COLUMNS if c[0] == "name" or (any(r.get(c[0]) is not None for r in runs) and not (
        c[0] == "engine" and all(r.get("engine", "runtime") == "runtime" for r in runs)))]


def table_rows(results: dict[str, Any], cols: list[tuple[str, str, str]] | None = None) -> list[list[str]]:
    return [[fmt(k, r.get(k)) for k, _, _ in (cols or COLUMNS)] for r in results["runs"]]


def write_csv(results: dict[str, Any], path: Path) -> None:
    runs = results["runs"]
    keys = [k for k in runs[0] if k != "taus"] if runs else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(r)


def plots(results: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    policies = sorted({r["policy"] for r in runs})
    out: dict[str, bytes] = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    colour = {pol: f"C{i}" for i, pol in enumerate(policies)}  # one colour per policy in every panel
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for pol in policies:
        rs = sorted((r for r in runs if r["policy"] == pol), key=lambda r: r["gpu_bytes"])
        x = [r["gpu_bytes"] / 2**20 for r in rs]
        c = colour[pol]
        ax[0].plot(x, [r["measured_decode_ms_per_token"] for r in rs], "o-", color=c, label=f"{pol} (measured)")
        ax[0].plot(x, [r["modelled_ms_per_token"] for r in rs], "x--", color=c, alpha=0.6, label=f"{pol} (modelled)")
        ax[1].plot(x, [r["agreement"] for r in rs], "o-", color=c, label=pol)
    dense = results.get("dense", {})
    if dense.get("measured_decode_ms_per_token"):
        ax[0].axhline(dense["measured_decode_ms_per_token"], color="k", lw=0.8, ls=":", label="dense (measured)")
    ax[0].set_xlabel("GPU memory of the placement (MiB)")
    ax[0].set_ylabel("ms / token (decode)")
    ax[0].set_title("Latency vs GPU memory per policy")
    ax[0].legend(fontsize=7)
    ax[1].set_xlabel("GPU memory of the placement (MiB)")
    ax[1].set_ylabel("next-token agreement with dense")
    ax[1].set_title("Quality vs GPU memory")
    ax[1].legend(fontsize=7)
    for pol in policies:
        rs = [r for r in runs if r["policy"] == pol and r.get("skipped_fraction") is not None]
        ax[2].plot([100 * r["skipped_fraction"] for r in rs], [r["agreement"] for r in rs], "o", color=colour[pol],
                   label=pol)
    ax[2].set_xlabel("FFN neurons skipped per token (%)")
    ax[2].set_ylabel("next-token agreement with dense")
    ax[2].set_title("Quality vs sparsity")
    ax[2].legend(fontsize=7)
    save(fig, "pareto.png")

    fig, ax = plt.subplots(figsize=(11, 3.6))
    for r in runs:
        taus = [t if t is not None else float("nan") for t in r["taus"]]
        ax.plot(range(len(taus)), taus, marker=".", label=r["name"])
    ax.set_xlabel("layer")
    ax.set_ylabel("τ_l (frequency threshold)")
    ax.set_title("Per-layer hotness threshold τ_l of each placement")
    ax.legend(fontsize=6, ncol=3)
    save(fig, "tau_per_layer.png")
    return out


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tokens(tc: Any) -> str:
    if isinstance(tc, dict):
        return " + ".join(f"{v:,} {k}" for k, v in tc.items() if v is not None) + " tokens"
    return f"{tc} tokens"


def summary_lines(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    d = results["dense"]
    lines = [
        f"Model: `{results['model']['source']}`; profile: {cfg['dataset']} {cfg['profile_split']} "
        f"({cfg['profile_limit']} prompts, {cfg['profile_mode']}, {_tokens(results['profile']['token_count'])}); "
        f"evaluation: {cfg['dataset']} {cfg['eval_split']} ({cfg['eval_limit']} prompts, teacher-forced on the reference solutions).",
        f"Activation sparsity target {cfg['sparsity']} ({' vs '.join(cfg['thresholds'])} thresholds), cold neurons found by "
        f"`{cfg['cold_mode']}`, weights {cfg['dtype']}, hardware `{results['hardware']['name']}`.",
        f"Dense reference: {d['measured_decode_ms_per_token']:.2f} ms/token decode, perplexity {d['perplexity']:.3f}"
        + (f", pass@1 {100 * d['pass_at_1']:.1f}%" if d.get("pass_at_1") is not None else "") + ".",
    ]
    hw = results["hardware"]
    dev = results.get("device", "cpu")
    where = f"`{dev}`" + (f" ({results['gpu_name']})" if results.get("gpu_name") else "")
    lines.append(f"Modelled ms/token are the cost model's for `{hw['name']}` ({hw.get('source', '')}); measured "
                 f"ms/token are this run's on {where}"
                 + (" where the GPU side runs on the CPU too, so the two sides' work adds up instead of overlapping."
                    if dev == "cpu" else "."))
    if "random" in results["model"]["source"]:
        lines.append("**Random weights**: latency and memory are the model shape's; quality numbers say only that the "
                     "hybrid model computes what the dense one does, not how well a real model of this shape codes.")
    return lines


def answer_lines(results: dict[str, Any]) -> list[str]:
    """Each policy against `fixed` at the same budget (and threshold kind): the study's answer, in numbers."""
    runs = results["runs"]
    lines = []
    wins: dict[str, list[float]] = {}
    for r in runs:
        base = next((b for b in runs if b["policy"] == "fixed" and b["budget"] == r["budget"]
                     and b.get("thresholds_kind") == r.get("thresholds_kind")), None)
        if base is None or r is base or r["policy"] == "fixed":
            continue
        meas = base["measured_decode_ms_per_token"] / r["measured_decode_ms_per_token"]
        model = base["modelled_ms_per_token"] / r["modelled_ms_per_token"]
        wins.setdefault(r["policy"], []).append(meas)
        extra = ""
        mig = r.get("migration")
        if mig:
            extra = (f"; migration moved {mig.get('neurons_moved', 0)} neurons "
                     f"({mig.get('bytes_per_token', 0) / 2**20:.2f} MiB/token)")
        lines.append(
            f"{r['budget']}: {r['policy']} vs fixed — measured {meas:.2f}× ({base['measured_decode_ms_per_token']:.3g} → "
            f"{r['measured_decode_ms_per_token']:.3g} ms/token), modelled {model:.2f}×, GPU memory "
            f"{(r['gpu_bytes'] - base['gpu_bytes']) / 2**20:+.1f} MiB, agreement {r['agreement'] - base['agreement']:+.3f}{extra}.")
    for pol, v in wins.items():
        faster = sum(x > 1.02 for x in v)
        slower = sum(x < 0.98 for x in v)
        lines.append(f"Overall {pol} vs fixed (measured): faster (> 2%) at {faster} of {len(v)} budgets, slower at {slower}, "
                     f"range {min(v):.2f}×–{max(v):.2f}×.")
    return lines


def _span(vals: list[float], f: str = ".1f") -> str:
    lo, hi = min(vals), max(vals)
    return f"{lo:{f}}" if f"{lo:{f}}" == f"{hi:{f}}" else f"{lo:{f}}–{hi:{f}}"


def conclusion_lines(results: dict[str, Any]) -> list[str]:
    """What a reader should conclude, in words: what was measured on this machine, what the cost model
    predicts for its target machine, and what follows from the two."""
    runs = [r for r in results["runs"] if r.get("measured_decode_ms_per_token") == r.get("measured_decode_ms_per_token")]
    if not runs:
        return []
    d = results["dense"]["measured_decode_ms_per_token"]
    hw = results["hardware"]
    gpu, cpu = hw.get("gpu") or {}, hw.get("cpu") or {}
    meas = [r["measured_decode_ms_per_token"] for r in runs]
    model = [r["modelled_ms_per_token"] for r in runs]
    agree = [r["agreement"] for r in runs]
    hot = [r["n_hot_fraction"] for r in runs]
    target = (f"`{hw['name']}` ({gpu.get('name', 'GPU')} at {gpu.get('bandwidth', 0) / 1e9:.0f} GB/s beside "
              f"{cpu.get('name', 'a CPU')} at {cpu.get('bandwidth', 0) / 1e9:.0f} GB/s)")
    vs_dense = ("slower than" if min(meas) > d * 1.02 else "faster than" if max(meas) < d * 0.98 else
                "some faster, some slower than" if min(meas) < d * 0.98 and max(meas) > d * 1.02 else "about as fast as")
    lines = []
    if results.get("device", "cpu") == "cpu":
        lines.append(
            f"Measured here, on this machine's CPU: dense decodes at {d:.1f} ms/token and the hybrid placements at "
            f"{_span(meas)} ms/token, {vs_dense} dense. Without a GPU both sides of the hybrid run on the same CPU "
            "cores, so their work adds up instead of overlapping, and what the hybrid saves here is only the reads "
            "of the neurons it skips: these timings show that the profiled, placed and exported model runs, not "
            "the speed-up on a GPU.")
        lines.append(
            f"Predicted by the cost model for {target}: {_span(model, '.2f')} ms/token with {_span([100 * h for h in hot], '.0f')}% "
            "of the FFN neurons on the GPU. That is a model (bytes touched / bandwidth), not a measurement; run "
            "`hotcold demo` on a CUDA machine to measure the GPU side.")
    else:
        where = results.get("gpu_name") or "this GPU"
        ratio = [m / p for m, p in zip(meas, model) if p > 0]
        lines.append(
            f"Measured here on {where}: dense decodes at {d:.2f} ms/token and the hybrid placements at {_span(meas, '.2f')} "
            f"ms/token ({vs_dense} dense; the hybrid keeps {_span([100 * h for h in hot], '.0f')}% of the FFN neurons on "
            f"the GPU, dense all of them). The cost model for {target} predicted {_span(model, '.2f')} ms/token"
            + (f": measured / modelled = {_span(ratio, '.2f')}×." if ratio else ".")
            + (" Dense fits on this GPU; a hybrid placement pays off for a model that does not, where the "
               "alternative is offloading whole layers (`hotcold bench` compares the two)." if vs_dense == "slower than" else ""))
    lines.append(
        f"Quality, which does not depend on the machine: next-token agreement with dense {_span(agree, '.3f')} on the "
        "held-out prompts with activation sparsity " + f"{results['config']['sparsity']:g} (1.000 = identical).")
    base = {(r["budget"], r.get("thresholds_kind")): r for r in runs if r["policy"] == "fixed"}
    ad = [(r, base[(r["budget"], r.get("thresholds_kind"))]) for r in runs
          if r["policy"] == "adaptive" and (r["budget"], r.get("thresholds_kind")) in base]
    if ad:
        m = [b["modelled_ms_per_token"] / r["modelled_ms_per_token"] for r, b in ad]
        x = [b["measured_decode_ms_per_token"] / r["measured_decode_ms_per_token"] for r, b in ad]
        lines.append(
            f"Adaptive vs fixed threshold at equal GPU memory (above 1: adaptive is faster): modelled "
            f"{_span(m, '.2f')}×, measured here {_span(x, '.2f')}×. "
            + ("On a CPU-only machine the measured ratio says little about a GPU; the modelled one is the prediction "
               "for the target machine until it is measured there." if results.get("device", "cpu") == "cpu"
               else "Both ratios are of this GPU."))
    return lines


def write_reports(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out = Path(out)
    write_csv(results, out / "results.csv")
    imgs = plots(results)
    for name, data in imgs.items():
        (out / name).write_bytes(data)
    cols = visible_columns(results)
    head = [h for _, _, h in cols]
    rows = table_rows(results, cols)
    answer = answer_lines(results)
    cmd = results.get("command", "")
    md = ["# hotcold study", "", *summary_lines(results), "", _md_table(head, rows), "",
          *(["## What the numbers mean", "", *conclusion_lines(results), ""] if conclusion_lines(results) else []),
          *(["## Against fixed thresholds", "", *[f"- {a}" for a in answer], ""] if answer else []),
          "![latency and quality vs GPU memory](pareto.png)", "", "![per-layer tau](tau_per_layer.png)", "",
          "Reproduce:", "", "```", cmd, "```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    body = [f"<h1>hotcold study</h1>"] + [f"<p>{html.escape(s)}</p>" for s in summary_lines(results)]
    body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>")
    concl = conclusion_lines(results)
    if concl:
        body.append("<h2>What the numbers mean</h2>" + "".join(f"<p>{html.escape(c)}</p>" for c in concl))
    if answer:
        body.append("<h2>Against fixed thresholds</h2><ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in answer) + "</ul>")
    for name, data in imgs.items():
        body.append(f'<p><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></p>')
    body.append(f"<p>Reproduce:</p><pre>{html.escape(cmd)}</pre>")
    html_path = out / "report.html"
    html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>hotcold study</title><style>"
                         "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
                         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
                         + "\n".join(body) + "</body></html>\n")
    return md_path, html_path
