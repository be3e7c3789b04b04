"""Open specquant's HTML reports in a real browser (headless Chromium) and check their layout.

For each report (the demo, a quantize run, a mixed-precision run and analyze, written fresh on
digits-mlp unless run folders are given) at each viewport width, the page is loaded with a
small checking script added at its end, and Chromium's DOM dump brings back:

* the page's scroll width against the viewport: the page must never scroll sideways;
* every element whose right edge passes the viewport and that is not inside a horizontally
  scrollable box (a wide table sits in one and scrolls there): there must be none;
* every plot: its natural and displayed size; a plot is legible when it is displayed at least
  60 % of its natural width (the text in the PNG is then at least 60 % of its 7-10 pt size) or
  at its full natural width;
* whether the configuration JSON is collapsed (``<details>`` not open).

A full-page screenshot of each report is saved (PNG) beside a JSON summary.  Exit status 0 when
every check passes, 1 otherwise.

    python benchmarks/browser_check.py --out runs/browser-check
    python benchmarks/browser_check.py --out /tmp/bc --chromium /usr/bin/chromium --widths 1280 800

Chromium runs with --headless --no-sandbox --disable-gpu, no network services and a fresh
profile folder per call (Debian: ``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIN_PLOT_SCALE = 0.6  # a plot shown at less than this share of its natural width is not legible
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-extensions", "--mute-audio")
TIMEOUT_S = 120

# Runs in the page once everything (the embedded PNGs included) is loaded; writes its findings as
# JSON into <pre id="sq-check">, which --dump-dom brings back.
CHECK_JS = r"""
<script>
window.addEventListener('load', function () {
  var vw = document.documentElement.clientWidth;
  function scrollBoxAbove(el) {
    for (var p = el.parentElement; p; p = p.parentElement) {
      var o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden') return true;
    }
    return false;
  }
  var wide = [];
  document.querySelectorAll('body *').forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 1 && !scrollBoxAbove(el)) {
      wide.push({tag: el.tagName.toLowerCase(), id: el.id || '', right: Math.round(r.right),
                 text: (el.textContent || '').trim().slice(0, 60)});
    }
  });
  var plots = [];
  document.querySelectorAll('img').forEach(function (img) {
    plots.push({alt: img.alt, natural: img.naturalWidth, shown: Math.round(img.getBoundingClientRect().width)});
  });
  var details = Array.prototype.map.call(document.querySelectorAll('details'), function (d) { return d.open; });
  var out = {viewport: vw, scroll_width: document.documentElement.scrollWidth,
             height: document.documentElement.scrollHeight, wide: wide.slice(0, 20), n_wide: wide.length,
             plots: plots, details_open: details,
             has_headline: !!document.getElementById('headline'),
             has_glossary: !!document.getElementById('glossary')};
  var pre = document.createElement('pre');
  pre.id = 'sq-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


@dataclass
class PageCheck:
    """The findings for one report at one viewport width."""

    report: str
    width: int
    scroll_width: int = 0
    height: int = 0
    n_wide: int = 0  # elements past the right edge outside a scroll box
    wide: list = field(default_factory=list)
    plots: list = field(default_factory=list)
    illegible_plots: list = field(default_factory=list)
    config_collapsed: bool = True
    has_headline: bool = False
    has_glossary: bool = False
    screenshot: str | None = None
    problems: list = field(default_factory=list)


def _chromium(binary: str, args: list[str], profile_root: Path) -> subprocess.CompletedProcess:
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=profile_root))
    try:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def check_page(binary: str, name: str, index: Path, width: int, shots: Path, work: Path) -> PageCheck:
    """Load ``index`` at ``width`` px with the checking script, then take a full-page screenshot."""
    res = PageCheck(report=name, width=width)
    probe = work / f"{name}-{width}.html"
    html = index.read_text(encoding="utf-8")
    probe.write_text(html.replace("</body>", CHECK_JS + "</body>", 1), encoding="utf-8")
    proc = _chromium(binary, [f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom",
                              probe.as_uri()], work)
    m = re.search(r'<pre id="sq-check">(.*?)</pre>', proc.stdout, re.S)
    if not m:
        res.problems.append(f"the checking script left no result (chromium exit {proc.returncode}: "
                            f"{proc.stderr.strip().splitlines()[-1:] or ''})")
        return res
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                       .replace("&amp;", "&"))
    res.scroll_width, res.height, res.n_wide, res.wide = (found["scroll_width"], found["height"], found["n_wide"],
                                                          found["wide"])
    res.plots = found["plots"]
    res.config_collapsed = not any(found["details_open"])
    res.has_headline, res.has_glossary = found["has_headline"], found["has_glossary"]
    vw = found["viewport"]
    if res.scroll_width > vw:
        res.problems.append(f"the page scrolls sideways: {res.scroll_width} px wide in a {vw} px viewport")
    if res.n_wide:
        res.problems.append(f"{res.n_wide} elements pass the right edge outside a scroll box, e.g. {res.wide[0]}")
    for p in res.plots:
        if p["natural"] and p["shown"] < p["natural"] and p["shown"] < MIN_PLOT_SCALE * p["natural"]:
            res.illegible_plots.append(p)
    if res.illegible_plots:
        res.problems.append(f"{len(res.illegible_plots)} plots shown below {MIN_PLOT_SCALE:.0%} of their natural "
                            f"width: {[p['alt'] for p in res.illegible_plots]}")
    if not res.config_collapsed:
        res.problems.append("the configuration JSON is open")
    shot = shots / f"{name}-{width}.png"
    height = max(600, min(res.height + 40, 16000))
    proc = _chromium(binary, [f"--window-size={width},{height}", "--virtual-time-budget=10000",
                              f"--screenshot={shot}", index.as_uri()], work)
    if shot.is_file():
        res.screenshot = str(shot)
    else:
        res.problems.append(f"no screenshot (chromium exit {proc.returncode})")
    return res


def make_reports(base: Path, python: str) -> dict[str, Path]:
    """The four reports on digits-mlp (no data directory needed), written into ``base``."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs = {
        "demo": ["demo"],
        "quantize": ["quantize", "digits-mlp", "--method", "gptq", "--bits", "3"],
        "mixed": ["quantize", "digits-mlp", "--method", "gptq", "--avg-bits", "3", "--policy", "sensitivity",
                  "--per-channel-bits"],
        "analyze": ["analyze", "digits-mlp", "--calib", "128"],
    }
    out = {}
    for name, argv in runs.items():
        folder = base / name
        proc = subprocess.run([python, "-m", "specquant", *argv, "--out", str(folder), "--quiet"],
                              capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"specquant {' '.join(argv)} failed: {proc.stderr.strip()}")
        out[name] = folder / "index.html"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the screenshots and browser_check.json")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium",
                    help="the Chromium binary (default: chromium on PATH)")
    ap.add_argument("--widths", type=int, nargs="+", default=[1280, 800], help="viewport widths in px")
    ap.add_argument("--run", action="append", metavar="NAME=DIR", default=None,
                    help="check this existing run folder instead of writing the four fresh ones (repeatable)")
    args = ap.parse_args(argv)
    if shutil.which(args.chromium) is None and not Path(args.chromium).is_file():
        print(f"browser_check: no Chromium at {args.chromium!r} (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sq-browser-") as tmp:
        work = Path(tmp)
        if args.run:
            reports = {n: Path(d) / "index.html" for n, d in (r.split("=", 1) for r in args.run)}
        else:
            reports = make_reports(work / "runs", sys.executable)
        checks = [check_page(args.chromium, name, index, w, out, work)
                  for name, index in reports.items() for w in args.widths]
    (out / "browser_check.json").write_text(json.dumps([asdict(c) for c in checks], indent=1))
    bad = 0
    print(f"{'report':<10}{'width':>6}{'page px':>9}{'too wide':>9}{'plots':>6}{'illegible':>10}  headline  problems")
    for c in checks:
        bad += bool(c.problems)
        print(f"{c.report:<10}{c.width:>6}{c.scroll_width:>9}{c.n_wide:>9}{len(c.plots):>6}"
              f"{len(c.illegible_plots):>10}  {'yes' if c.has_headline else 'no':<8}  {'; '.join(c.problems) or '-'}")
    print(f"screenshots and browser_check.json in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
