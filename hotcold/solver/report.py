"""Placement reports: a rich table for the terminal, markdown (+ PNG files) and self-contained HTML.

Every number comes from the placements' manifests; nothing is re-solved. Several placements (of the
same model) are compared side by side. The "why" column says what limits each layer (design.md §4):

  cpu-bound   the CPU side is slower: the GPU budget is what limits the layer. While that holds in every
              layer, each hot slot is worth the same per unit of activation frequency whatever its layer,
              so the optimum is one frequency threshold τ for all of them; a layer's hot fraction is the
              share of its neurons that fire at least τ often — its own frequency curve decides it.
  balanced    GPU and CPU sides take the same time: one more hot neuron would lengthen the GPU side.
  gpu-bound   the GPU side is slower (its hot rows are read densely, p_i below BW_cpu/BW_gpu costs more
              there than on the CPU in predictor mode).
  all-hot     the whole FFN is on the GPU: no exchange with the CPU in this layer.
  all-cold    no hot neuron (the budget is elsewhere, or fewer than C_l would not pay for the sync).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from hotcold.memory import format_bytes
from hotcold.solver.placement import Placement

GPU_PARTS = ("attention", "norms", "embedding", "lm_head", "final_norm", "kv_cache", "predictors", "buffers",
             "ffn_hot")


def label(p: Placement) -> str:
    par = p.manifest["policy"]["parameters"]
    extra = f" τ={par['tau']:g}" if par.get("tau") is not None else ""
    return f"{p.policy}{extra}"


def why(p: Placement, layer: dict[str, Any]) -> str:
    """One line: what limits this layer and so why it has the hot fraction it has."""
    t = layer["time_ms"]
    k, regime = layer["n_hot"], layer["regime"]
    par = p.manifest["policy"]["parameters"]
    tau = layer["tau"]
    if regime == "all-hot":
        return "all hot: whole FFN on the GPU, no sync"
    if regime == "all-cold":
        c = layer["min_hot"]
        return (f"no hot neuron: fewer than C_l={c} would not pay for the sync" if par.get("min_hot") and c > 0
                else "no hot neuron: the budget serves other layers' more frequent neurons")
    cl = ""
    if par.get("min_hot") and layer["min_hot"] > 0 and k <= max(layer["min_hot"], par.get("group_size") or 1):
        cl = f"; C_l={layer['min_hot']} binding"
    if regime == "cpu-bound":
        return (f"CPU-bound (CPU {t['cpu']:.2f} > GPU FFN {t['gpu']:.2f} ms): hot iff f ≥ {tau:.3g}, "
                f"which {layer['hot_fraction']:.0%} of its neurons reach{cl}")
    if regime == "balanced":
        return (f"balanced (GPU FFN {t['gpu']:.2f} ≈ CPU {t['cpu']:.2f} ms, mean f {layer['mean_frequency']:.3g}): "
                f"more hot neurons would slow the GPU side{cl}")
    if regime == "gpu-bound":
        return f"GPU-bound (GPU FFN {t['gpu']:.2f} > CPU {t['cpu']:.2f} ms){cl}"
    return f"one memory bus: GPU FFN {t['gpu']:.2f} + CPU {t['cpu']:.2f} ms{cl}"


def summary_text(placements: list[Placement]) -> list[str]:
    """Paragraphs explaining the placements: what binds, which layers got most and least, policies compared."""
    out = []
    for p in placements:
        layers = p.layers
        regimes: dict[str, int] = {}
        for x in layers:
            regimes[x["regime"]] = regimes.get(x["regime"], 0) + 1
        hi = max(layers, key=lambda x: x["hot_fraction"])
        lo = min(layers, key=lambda x: x["hot_fraction"])
        cm = p.manifest["cost_model"]
        txt = (f"**{label(p)}** ({p.status}, gap {p.manifest['solver']['gap']:.2g}): "
               f"{p.totals['modelled_ms_per_token']:.2f} ms/token modelled, {p.totals['hot_fraction']:.1%} of neurons hot "
               f"serving {p.totals['gpu_share']:.1%} of activations. Layers by what limits them: "
               + ", ".join(f"{v} {k}" for k, v in sorted(regimes.items())) + ". ")
        if hi["layer"] != lo["layer"]:
            txt += (f"Layer {hi['layer']} has {hi['hot_fraction']:.0%} of its neurons hot and layer {lo['layer']} "
                    f"{lo['hot_fraction']:.0%}: layer {hi['layer']} — {why(p, hi)}; layer {lo['layer']} — {why(p, lo)}. ")
        if regimes.get("balanced", 0):
            txt += ("In balanced layers the cut sits where the hot rows, read densely on the GPU, take as long as the "
                    "cold neurons on the CPU; a layer whose neurons fire more often (higher mean f) leaves more CPU "
                    "work per cold neuron and so balances with more of them hot. ")
        if regimes.get("gpu-bound", 0):
            txt += (f"{regimes['gpu-bound']} layers are GPU-bound: their hot rows take longer than the cold neurons "
                    "left on the CPU, so part of their GPU memory would serve CPU-bound layers better (a per-layer "
                    "threshold can move it; one global τ cannot). ")
        if regimes.get("cpu-bound", 0) == len(layers):
            txt += ("Every layer is CPU-bound, so minimising latency is the same as maximising the activations the "
                    "GPU serves: one global frequency threshold is optimal here and fixed, impact and adaptive agree "
                    "(up to ties and group rounding). ")
        be = cm.get("breakeven_frequency")
        if be is not None and 0 < be < 1:
            txt += (f"With a dense GPU side, a neuron firing less often than {be:.2%} is cheaper on the CPU "
                    f"(cold mode {p.cold_mode}), so filling the GPU budget is not always right. ")
        out.append(txt)
    if len(placements) > 1:
        best = min(placements, key=lambda q: q.totals["modelled_ms_per_token"])
        out.append(f"Fastest modelled: **{label(best)}** at {best.totals['modelled_ms_per_token']:.2f} ms/token. "
                   "Policies part ways only where the GPU side binds (large budgets), where a sync makes a small "
                   "split a loss, or where C_l rules out a split; the cost model is the same for all of them.")
    return out


# ---- terminal -----------------------------------------------------------------------------------
def comparison_table(placements: list[Placement]):
    from rich.table import Table

    t = Table(title="placements")
    for col in CMP_HEAD_TERM:
        t.add_column(col, justify="left" if col in ("policy", "status") else "right", no_wrap=col in ("policy", "status", "ms/token"))
    for p in placements:
        s, tot, b = p.manifest["solver"], p.totals, p.manifest["budgets"]
        t.add_row(label(p), s["status"], f"{s['gap']:.1g}", f"{s['seconds']:.2f}",
                  f"{format_bytes(tot['gpu_bytes'])} / {format_bytes(b['gpu_bytes'])}",
                  f"{format_bytes(tot['cpu_bytes'])} / {format_bytes(b['cpu_bytes'])}",
                  f"{tot['hot_fraction']:.1%}", f"{tot['gpu_share']:.1%}", f"{tot['modelled_ms_per_token']:.2f}")
    return t


CMP_HEAD_TERM = ["policy", "status", "gap", "s", "GPU / budget", "CPU / budget", "hot", "GPU share", "ms/token"]


def layer_table(p: Placement):
    from rich.table import Table

    t = Table(title=f"{label(p)}: per layer ({p.cold_mode} mode, {p.dtype})")
    for col in LAYER_HEAD:
        t.add_column(col, justify="left" if col == "why" else "right", overflow="fold")
    for x in p.layers:
        tm = x["time_ms"]
        t.add_row(str(x["layer"]), str(x["n_hot"]), f"{x['hot_fraction']:.1%}",
                  "—" if x["tau"] is None else f"{x['tau']:.3g}", f"{x['gpu_share']:.1%}",
                  f"{tm['pre'] + tm['gpu']:.3f}", f"{tm['cpu']:.3f}", f"{tm['sync']:.3f}", f"{tm.get('host', 0.0):.3f}",
                  f"{tm['total']:.3f}", why(p, x))
    return t


def print_report(placements: list[Placement], console) -> None:
    from rich.markdown import Markdown

    for p in placements:
        console.print(layer_table(p))
    console.print(comparison_table(placements))
    for para in summary_text(placements):
        console.print(Markdown(para))


# ---- plots ----------------------------------------------------------------------------------------
def _plots(placements: list[Placement]) -> dict[str, bytes]:
    """name -> PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i, p in enumerate(placements):
        L = [x["layer"] for x in p.layers]
        ax.plot(L, [x["hot_fraction"] for x in p.layers], marker=".", color=colors[i % len(colors)], label=label(p))
        ax2.plot(L, [x["tau"] if x["tau"] is not None else float("nan") for x in p.layers], marker=".",
                 color=colors[i % len(colors)], label=label(p))
    ax.set_ylabel("hot fraction")
    ax.set_title("hot neurons per layer and the threshold τ_l that results")
    ax.legend(fontsize=8)
    ax2.set_ylabel("τ_l (frequency)")
    ax2.set_yscale("log")
    ax2.set_xlabel("layer")
    figs["hot_fraction_tau"] = fig

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for i, p in enumerate(placements):
        ax.plot([x["layer"] for x in p.layers], [x["gpu_share"] for x in p.layers], marker=".",
                color=colors[i % len(colors)], label=label(p))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of activations on GPU")
    ax.set_title("activation coverage per layer")
    ax.legend(fontsize=8)
    figs["coverage"] = fig

    p0 = placements[0]
    grid = p0.manifest.get("rank_grid")
    if grid:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        n = len(p0.layers)
        for x in p0.layers[:: max(1, n // 8)]:
            ax.plot(grid, [max(v, 1e-6) for v in x["f_at_rank"]], label=f"layer {x['layer']}")
            if x["tau"] is not None:
                ax.plot([x["hot_fraction"]], [max(x["tau"], 1e-6)], "k.", ms=6)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of the layer's neurons (hottest first)")
        ax.set_ylabel("activation frequency f")
        ax.set_title(f"frequency curves; dots: where {label(p0)} cut each layer")
        ax.legend(fontsize=7, ncol=3)
        figs["frequency_curves"] = fig

    fig, ax = plt.subplots(figsize=(9, 3.8))
    names = [label(p) for p in placements]
    x = range(len(placements))
    width = 0.38
    bottom = [0.0] * len(placements)
    for j, part in enumerate(GPU_PARTS):
        vals = [p.manifest["memory"]["gpu"].get(part, 0) / 2**30 for p in placements]
        if any(vals):
            ax.bar([i - width / 2 for i in x], vals, width, bottom=bottom, label=f"GPU {part}",
                   color=plt.cm.Blues(0.3 + 0.7 * j / len(GPU_PARTS)))
            bottom = [b + v for b, v in zip(bottom, vals)]
    cb = [0.0] * len(placements)
    for j, part in enumerate(("ffn_cold", "buffers")):
        vals = [p.manifest["memory"]["cpu"].get(part, 0) / 2**30 for p in placements]
        ax.bar([i + width / 2 for i in x], vals, width, bottom=cb, label=f"CPU {part}",
               color=plt.cm.Oranges(0.5 + 0.3 * j))
        cb = [b + v for b, v in zip(cb, vals)]
    for i, p in enumerate(placements):
        b = p.manifest["budgets"]
        ax.hlines(b["gpu_bytes"] / 2**30, i - width, i, colors="navy", linestyles="--")
        ax.hlines(b["cpu_bytes"] / 2**30, i, i + width, colors="darkred", linestyles="--")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("GiB")
    ax.set_title("memory by component (left GPU, right CPU; dashed: budgets)")
    ax.legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figs["memory"] = fig

    fig, ax = plt.subplots(figsize=(9, 3.8))
    for i, p in enumerate(placements):
        c = colors[i % len(colors)]
        L = [x["layer"] for x in p.layers]
        ax.plot(L, [x["time_ms"]["total"] for x in p.layers], color=c, label=f"{label(p)} total")
        if i == 0:
            ax.plot(L, [x["time_ms"]["gpu"] for x in p.layers], color=c, ls=":", label=f"{label(p)} GPU FFN")
            ax.plot(L, [x["time_ms"]["cpu"] for x in p.layers], color=c, ls="--", label=f"{label(p)} CPU FFN")
    ax.set_xlabel("layer")
    ax.set_ylabel("ms per token")
    ax.set_title("modelled latency per layer")
    ax.legend(fontsize=7)
    figs["latency_layers"] = fig

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(placements) + 2))
    rows = [critical_path(p) for p in placements]
    left = [0.0] * len(placements)
    for part, name in (("pre", "attention etc."), ("gpu", "GPU FFN"), ("cpu", "CPU FFN"), ("sync", "sync"),
                       ("host", "host overhead"), ("head", "LM head")):
        vals = [r[part] for r in rows]
        ax.barh(names, vals, left=left, label=name)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("modelled ms per token (critical path)")
    ax.set_title("latency breakdown by policy")
    ax.legend(fontsize=7, loc="lower right")
    figs["latency_policies"] = fig

    out = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def critical_path(p: Placement) -> dict[str, float]:
    """ms per token by what is on the critical path: pre, the slower FFN side of each layer, sync, head."""
    overlap = p.manifest["cost_model"].get("overlap", True)
    r = {"pre": 0.0, "gpu": 0.0, "cpu": 0.0, "sync": 0.0, "host": 0.0, "head": p.totals["time_ms"]["head"]}
    for x in p.layers:
        t = x["time_ms"]
        r["pre"] += t["pre"]
        r["sync"] += t["sync"]
        r["host"] += t.get("host", 0.0)  # placements older than the host-overhead term have none
        if not overlap:
            r["gpu"] += t["gpu"]
            r["cpu"] += t["cpu"]
        elif t["gpu"] >= t["cpu"]:
            r["gpu"] += t["gpu"]
        else:
            r["cpu"] += t["cpu"]
    return r


PLOT_TITLES = {
    "hot_fraction_tau": "Hot fraction and τ_l per layer",
    "coverage": "Activation coverage per layer",
    "frequency_curves": "Frequency curves and where each layer was cut",
    "memory": "Memory breakdown vs budget",
    "latency_layers": "Modelled latency per layer",
    "latency_policies": "Policies compared",
}


# ---- files ---------------------------------------------------------------------------------------
def _layer_rows(p: Placement) -> list[list[str]]:
    rows = []
    for x in p.layers:
        tm = x["time_ms"]
        rows.append([str(x["layer"]), str(x["n_hot"]), f"{x['hot_fraction']:.1%}",
                     "—" if x["tau"] is None else f"{x['tau']:.3g}", f"{x['gpu_share']:.1%}",
                     f"{tm['pre'] + tm['gpu']:.3f}", f"{tm['cpu']:.3f}", f"{tm['sync']:.3f}",
                     f"{tm.get('host', 0.0):.3f}", f"{tm['total']:.3f}", why(p, x)])
    return rows


LAYER_HEAD = ["layer", "hot", "hot %", "τ_l", "GPU share", "GPU ms", "CPU ms", "sync ms", "host ms", "total ms",
              "why"]
CMP_HEAD = ["policy", "status", "gap", "solve s", "GPU", "GPU budget", "CPU", "CPU budget", "hot", "GPU share",
            "ms/token"]


def _cmp_rows(placements: list[Placement]) -> list[list[str]]:
    rows = []
    for p in placements:
        s, tot, b = p.manifest["solver"], p.totals, p.manifest["budgets"]
        rows.append([label(p), s["status"], f"{s['gap']:.2g}", f"{s['seconds']:.2f}", format_bytes(tot["gpu_bytes"]),
                     format_bytes(b["gpu_bytes"]), format_bytes(tot["cpu_bytes"]), format_bytes(b["cpu_bytes"]),
                     f"{tot['hot_fraction']:.1%}", f"{tot['gpu_share']:.1%}", f"{tot['modelled_ms_per_token']:.2f}"])
    return rows


def _context(placements: list[Placement]) -> list[str]:
    p = placements[0]
    cfg, hw, cm = p.manifest["model"]["config"], p.manifest["hardware"], p.manifest["cost_model"]
    return [f"model: {cfg.get('name')} ({cfg['n_layers']} layers × {cfg['n_ff']} FFN neurons), "
            f"fingerprint {p.fingerprint}",
            f"hardware: {hw['name']} — {hw.get('source', '')}; GPU {hw['gpu']['bandwidth'] / 1e9:.0f} GB/s, "
            f"CPU {hw['cpu']['bandwidth'] / 1e9:.1f} GB/s, sync {hw['link']['sync_seconds'] * 1e6:.1f} µs"
            + (f", host overhead {hw['link']['host_overhead_seconds'] * 1e6:.0f} µs per split layer"
               if hw["link"].get("host_overhead_seconds") else ""),
            f"cost model: {p.cold_mode} cold mode, {p.dtype}, context {p.manifest['ctx_len']}, attention etc. "
            f"{cm['pre_ms_per_layer']:.3f} ms/layer before the split, LM head {cm['head_ms']:.3f} ms",
            f"profile: {p.manifest['profile'].get('content_hash', '?')[:16]} ({_dataset(p.manifest['profile'])})"]


def _dataset(profile_ref: dict[str, Any]) -> str:
    """The profile's dataset in words ('mbpp, split test, 100 prompts'), not its raw manifest dict."""
    ds = profile_ref.get("dataset")
    if not isinstance(ds, dict):
        return str(ds or "unknown dataset")
    words = [str(ds.get("name") or "unknown dataset")]
    words += [f"{k} {ds[k]}" for k in ("split", "seed") if ds.get(k) is not None]
    if ds.get("n_prompts"):
        words.append(f"{ds['n_prompts']} prompts")
    return ", ".join(words)


def render_markdown(placements: list[Placement], plot_dir_name: str,
                    plots: dict[str, bytes] | None = None) -> tuple[str, dict[str, bytes]]:
    plots = plots if plots is not None else _plots(placements)
    md = ["# hotcold placement report", ""]
    md += [f"- {line}" for line in _context(placements)] + [""]
    md += ["## Summary", ""] + [para + "\n" for para in summary_text(placements)]
    md += ["## Policies", "", _md_table(CMP_HEAD, _cmp_rows(placements)), ""]
    md += ["## Plots", ""]
    for name in plots:
        md += [f"### {PLOT_TITLES.get(name, name)}", "", f"![{name}]({plot_dir_name}/{name}.png)", ""]
    for p in placements:
        md += [f"## {label(p)}: per layer", "", _md_table(LAYER_HEAD, _layer_rows(p)), ""]
    return "\n".join(md), plots


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_html(placements: list[Placement], plots: dict[str, bytes] | None = None) -> str:
    plots = plots if plots is not None else _plots(placements)
    e = html.escape

    def table(head: list[str], rows: list[list[str]]) -> str:
        h = "".join(f"<th>{e(c)}</th>" for c in head)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    def para(text: str) -> str:
        parts = e(text).split("**")
        return "<p>" + "".join(f"<b>{s}</b>" if i % 2 else s for i, s in enumerate(parts)) + "</p>"

    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>hotcold placement report</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
           "td:last-child{text-align:left}img{max-width:100%}</style></head><body>",
           "<h1>hotcold placement report</h1><ul>"]
    out += [f"<li>{e(line)}</li>" for line in _context(placements)] + ["</ul><h2>Summary</h2>"]
    out += [para(t) for t in summary_text(placements)]
    out += ["<h2>Policies</h2>", table(CMP_HEAD, _cmp_rows(placements)), "<h2>Plots</h2>"]
    for name, png in plots.items():
        b64 = base64.b64encode(png).decode("ascii")
        out.append(f"<h3>{e(PLOT_TITLES.get(name, name))}</h3><img alt='{e(name)}' src='data:image/png;base64,{b64}'>")
    for p in placements:
        out += [f"<h2>{e(label(p))}: per layer</h2>", table(LAYER_HEAD, _layer_rows(p))]
    out.append("</body></html>")
    return "\n".join(out)


def write_reports(placements: list[Placement], html_path: str | Path | None = None,
                  markdown_path: str | Path | None = None) -> list[Path]:
    """Write the HTML report (self-contained: plots embedded as base64 PNG) and/or the markdown report
    (plots as PNG files in `<stem>_plots/` beside it, linked relatively). Plots are drawn once."""
    from hotcold.artifacts import atomic_write_text

    if not placements or not (html_path or markdown_path):
        return []
    plots = _plots(placements)
    written = []
    if html_path:
        atomic_write_text(html_path, render_html(placements, plots))
        written.append(Path(html_path))
    if markdown_path:
        path = Path(markdown_path)
        plot_dir = path.with_name(f"{path.stem}_plots")
        text, _ = render_markdown(placements, plot_dir.name, plots)
        plot_dir.mkdir(parents=True, exist_ok=True)
        for name, png in plots.items():
            (plot_dir / f"{name}.png").write_bytes(png)
        atomic_write_text(path, text)
        written.append(path)
    return written
