"""The placement report as a reader gets it: HTML opened in headless Chromium, markdown rendered.

The reports come from real solves (fixed, impact, adaptive) of a synthetic SmolLM2-shaped profile on the
h200 preset. The static checks always run: every <img> of the HTML is a data: URI holding a complete,
well-formed PNG (chunk CRCs, IHDR size, IDAT inflating to exactly the pixel rows IHDR promises — no PIL),
and the markdown's tables have one column count per table and its image links point at files that exist.
The browser check runs when a Chromium binary is found (`apt-get install chromium`; CI may not have it):
Chromium loads the report, an inline script checks each of `document.images` (`complete &&
naturalWidth > 0`), draws it on a canvas and counts its opaque pixels (a truncated PNG
decodes partly and leaves transparent rows; matplotlib's plots are opaque), and writes the result into
the DOM, which `--dump-dom` returns; a screenshot of the
page must be a well-formed PNG of the window's size that is not blank (many colours, plot-coloured pixels).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from hotcold.model.config import SHAPES
from hotcold.solver.report import PLOT_TITLES, write_reports
from hotcold.solver.solve import solve
from hotcold.solver.synth import synthetic_profile

PNG_SIG = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """report.html and report.md (+ report_plots/) of three real placements of one profile and budget."""
    prof = synthetic_profile(SHAPES["smollm2-135m"], seed=3, tokens=4096)
    placements = [solve(prof, "h200", policy=p, gpu_budget="250MiB", ctx_len=2048, cold_mode="predictor")
                  for p in ("fixed", "impact", "adaptive")]
    d = tmp_path_factory.mktemp("report")
    write_reports(placements, html_path=d / "report.html", markdown_path=d / "report.md")
    return d / "report.html", d / "report.md"


# ---- PNG, without PIL ------------------------------------------------------------------------------
def png_info(data: bytes) -> tuple[int, int, bytes]:
    """Check a PNG's structure; returns (width, height, raw filtered scanlines). Fails the test if broken."""
    assert data[:8] == PNG_SIG, "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert len(body) == n and zlib.crc32(kind + body) == crc, f"chunk {kind!r} truncated or corrupt"
        chunks.append((kind, body))
        pos += 12 + n
        if kind == b"IEND":
            break
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", "PNG must start with IHDR and end with IEND"
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert w > 0 and h > 0 and ctype in CHANNELS
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    if interlace == 0:  # each row: one filter byte + the row's samples
        assert len(raw) == h * (1 + -(-w * CHANNELS[ctype] * depth // 8)), "IDAT does not hold the image IHDR promises"
    return w, h, raw


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


# ---- static checks (always run) --------------------------------------------------------------------
def test_html_images_are_embedded_valid_pngs(reports):
    html, _ = reports
    parser = Images()
    parser.feed(html.read_text())
    assert len(parser.srcs) == len(PLOT_TITLES)  # every plot, including the frequency curves
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        w, h, _ = png_info(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert w >= 300 and h >= 100


def test_markdown_report_renders_with_consistent_tables_and_existing_images(reports):
    from markdown_it import MarkdownIt

    _, md = reports
    text = md.read_text()
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables, cells, rows = [], None, None
    for t in tokens:  # column count of every row (header and body) of every table
        if t.type == "table_open":
            rows = []
        elif t.type == "tr_open":
            cells = 0
        elif t.type in ("th_open", "td_open"):
            cells += 1
        elif t.type == "tr_close":
            rows.append(cells)
        elif t.type == "table_close":
            tables.append(rows)
    assert len(tables) == 1 + 3  # the policy comparison + one per-layer table per placement
    for rows in tables:
        assert len(rows) >= 2 and len(set(rows)) == 1, f"ragged table: {rows}"
    assert tables[0] == [11] * 4 and all(r == [11] * 31 for r in tables[1:])  # 30 layers + header
    # a row with the wrong number of '|' would render as fewer/more cells: compare with the source lines
    for line in text.splitlines():
        if line.startswith("|"):
            assert len(re.split(r"(?<!\\)\|", line)) - 2 == 11, line

    html = MarkdownIt("commonmark").enable("table").render(text)
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) == len(PLOT_TITLES)
    for src in imgs:
        f = md.parent / src
        assert f.is_file(), f"markdown links {src}, which does not exist"
        png_info(f.read_bytes())


def test_placements_without_host_overhead_still_report():
    """Placements written before time_ms.host existed render, with 0 host overhead."""
    import copy

    from hotcold.solver.placement import Placement
    from hotcold.solver.report import critical_path, render_html, render_markdown

    prof = synthetic_profile(SHAPES["smollm2-135m"], seed=3, tokens=4096)
    new = solve(prof, "h200-decode", policy="adaptive", gpu_budget="250MiB", ctx_len=2048)
    m = copy.deepcopy(new.manifest)
    for x in m["layers"]:
        del x["time_ms"]["host"]
    del m["totals"]["time_ms"]["host"]
    del m["hardware"]["link"]["host_overhead_seconds"]
    old = Placement(manifest=m, order=new.order, n_hot=new.n_hot)
    assert critical_path(old)["host"] == 0.0
    assert new.totals["time_ms"]["host"] > 0
    assert critical_path(new)["host"] == pytest.approx(new.totals["time_ms"]["host"])
    text, plots = render_markdown([new, old], "plots")
    assert "host overhead 274 µs per split layer" in text and len(plots) == len(PLOT_TITLES)
    assert "<img" in render_html([old], plots)


# ---- the browser -----------------------------------------------------------------------------------
def chromium() -> str | None:
    for name in (os.environ.get("HOTCOLD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome", "headless_shell"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHECK = """<script>
window.addEventListener('load', function () {  // 'load' waits for every image; all below is synchronous
  var rows = Array.prototype.slice.call(document.images).map(function (img) {
    if (!img.complete || img.naturalWidth === 0 || img.naturalHeight === 0) return 'broken';
    // draw it: a truncated PNG still decodes (partly), but its missing rows come out transparent
    var c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    var ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    var d = ctx.getImageData(0, 0, c.width, c.height).data, opaque = 0;
    for (var j = 3; j < d.length; j += 4) if (d[j] === 255) opaque++;
    return img.naturalWidth + 'x' + img.naturalHeight + '@' + (opaque / (d.length / 4)).toFixed(4);
  });
  var p = document.createElement('pre');
  p.id = 'hotcold-check';
  p.textContent = 'images=' + rows.join(';');
  document.body.appendChild(p);
});
</script>"""


def run_chromium(exe: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={cwd / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=False, timeout=120, cwd=cwd)


@pytest.mark.skipif(chromium() is None, reason="no Chromium binary found (apt-get install chromium, or set "
                                                "HOTCOLD_CHROMIUM): the headless browser check is skipped")
def test_html_report_in_headless_chromium(reports, tmp_path):
    import numpy as np

    exe = chromium()
    html, _ = reports
    text = html.read_text()
    assert text.count("</body>") == 1
    page = tmp_path / "report_checked.html"  # the report as written, plus the counting script
    page.write_text(text.replace("</body>", CHECK + "</body>"))

    r = run_chromium(exe, "--virtual-time-budget=5000", "--dump-dom", page.as_uri(), cwd=tmp_path)
    dom = r.stdout.decode("utf-8", "replace")
    m = re.search(r'<pre id="hotcold-check">images=([^<]*)</pre>', dom)
    assert m, f"Chromium (rc {r.returncode}) did not run the check: {r.stderr.decode()[-800:]}"
    seen = m[1].split(";")
    decoded = [x for x in seen if x != "broken" and float(x.split("@")[1]) >= 0.999]
    print(f"chromium: {len(decoded)}/{len(seen)} images decoded and fully drawn: {seen}")
    assert len(seen) == len(PLOT_TITLES) and len(decoded) == len(seen)
    parser = Images()  # the sizes the browser decoded are the sizes the PNGs declare
    parser.feed(text)
    declared = ["{}x{}".format(*png_info(base64.b64decode(src.split(",", 1)[1]))[:2]) for src in parser.srcs]
    assert [x.split("@")[0] for x in seen] == declared
    assert "hotcold placement report" in dom and dom.count("<table>") == 4
    assert "profile: " in dom and "(synthetic)" in dom and "{" not in dom.split("profile: ")[1][:80]  # words, not a dict

    shot = tmp_path / "report.png"
    r = run_chromium(exe, f"--screenshot={shot}", "--window-size=1200,2400", "--virtual-time-budget=5000",
                     page.as_uri(), cwd=tmp_path)
    assert shot.is_file(), f"no screenshot (rc {r.returncode}): {r.stderr.decode()[-800:]}"
    assert png_info(shot.read_bytes())[:2] == (1200, 2400)
    from PIL import Image  # Pillow comes with matplotlib; decoding Chromium's filtered rows by hand is slow

    img = np.asarray(Image.open(shot).convert("RGB"))
    rgb = img.reshape(-1, 3)
    non_white = float((rgb.min(axis=1) < 240).mean())
    colours = len(np.unique(rgb[:: 7], axis=0))
    # plot lines in matplotlib's default blue/orange/green: saturated pixels that text and tables lack
    saturated = int(((rgb.max(axis=1).astype(int) - rgb.min(axis=1)) > 80).sum())
    print(f"screenshot: {img.shape[1]}x{img.shape[0]}, {non_white:.1%} non-white, {colours} colours, "
          f"{saturated} saturated pixels")
    assert non_white > 0.02 and colours > 50 and saturated > 1000
