"""The Snakemake report of the session's shared default run, opened in headless Debian chromium:
the page and one figure of every family render (not blank), with their names, captions and
labels, and the loading screen is gone.

The report is one HTML file whose React app renders from embedded data. One copy of it, with a
few lines of script appended, tours the whole report in one browser launch: it records the
workflow page, then opens each figure the way a reader's clicks do (`app.showCategory`, then
the result's view and info buttons) and records what is shown, how large, and how varied its
pixels are; the record comes back in the dumped DOM. One screenshot checks the page itself.

Each figure as the browser drew it comes back too (a PNG at twice the figure's size): the tour's
`shots/` folder under pytest's tmp dir keeps them, and DPSCALE_SHOTS=<dir> copies them there
(with the page's own screenshot, home.png) for a person to look at after the run.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT, require

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1600,1100",
)
HOME_HEADING = "dpscale: the same DP-SGD experiment in every framework"
CATEGORIES = (
    "Accuracy vs privacy",
    "Training curves",
    "Runtime",
    "Disparate impact",
    "Membership inference",
    "Confusion matrices",
    "Summary table",
)
# (category, file name suffix, a phrase of its caption, label values the info panel shows)
FIGURES = (
    ("Accuracy vs privacy", "/accuracy_vs_epsilon.svg", "Test accuracy against the privacy budget",
     ["accuracy vs epsilon", "test accuracy"]),
    ("Accuracy vs privacy", "balanced_accuracy_vs_epsilon.svg", "Balanced test accuracy",
     ["accuracy vs epsilon", "balanced accuracy"]),
    ("Training curves", "training/longtail.svg", "Loss per epoch on split longtail",
     ["loss per epoch", "longtail"]),
    ("Runtime", "runtime/seconds_per_epoch.svg", "Seconds per epoch", ["seconds per epoch"]),
    ("Runtime", "runtime/step_time_ratio.svg", "DP step time over non-private step time",
     ["DP / non-private step time"]),
    ("Disparate impact", "disparate_impact/longtail.svg", "Disparate impact on split longtail",
     ["per-class accuracy drop", "longtail"]),
    ("Membership inference", "membership/roc/balanced.svg", "loss-threshold membership attack",
     ["loss-attack ROC", "balanced"]),
    ("Membership inference", "membership/histograms/longtail/opacus.svg",
     "Membership inference, opacus on split longtail", ["train vs holdout loss", "opacus"]),
    ("Membership inference", "membership/epsilon_audit.svg",
     "Empirical ε lower bound against the accounted ε", ["empirical vs accounted epsilon"]),
    ("Confusion matrices", "confusion/balanced/reference/eps8/default.svg",
     "Confusion matrix of reference on split balanced", ["reference", "≤ 8 (target)"]),
)  # fmt: skip


# The tour: one view change per tick (App.setView merges into the state of the last render, so
# two calls in one tick would undo each other); the record is written into <pre id=tour>.
TOUR_JS = """
const step = (delay, action) =>
  new Promise((done) => setTimeout(() => done(action()), delay));
const visible = (el) => !!el && el.getClientRects().length > 0
  && getComputedStyle(el).display !== "none" && getComputedStyle(el).visibility !== "hidden";
const appText = () => document.querySelector("#app").innerText;
function drawn(img) {  // the figure as the browser renders it, at twice its size, on white
  const canvas = document.createElement("canvas");
  canvas.width = 2 * img.naturalWidth; canvas.height = 2 * img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "white"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas;
}
function pixelStd(canvas) {  // grey-level std of the drawn image: 0 for a blank figure
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0, sum = 0, sq = 0;
  for (let i = 0; i < d.length; i += 4) {
    const g = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
    n += 1; sum += g; sq += g * g;
  }
  return Math.sqrt(Math.max(0, sq / n - (sum / n) ** 2));
}
(async function () {
  const tour = {figures: {}};
  await step(500, () => {
    tour.home = {
      text: appText(),
      title: (document.querySelector("#app .title") || {}).textContent || null,
      loading_screen_visible: visible(document.querySelector("#loading-screen")),
    };
  });
  for (const [category, suffix] of __FIGURES__) {
    const path = Object.keys(results).find((p) => ("/" + p).endsWith(suffix));
    const seen = {found: path !== undefined};
    tour.figures[suffix] = seen;
    if (!seen.found) continue;
    const uri = results[path].data_uri;
    await step(300, () => app.showCategory(category));
    await step(300, () => app.showResultInfo(path));
    await step(300, () => app.setView({content: "img", contentPath: uri, resultPath: path}));
    await step(1000, () => {
      const img = Array.from(document.images).find((i) => i.getAttribute("src") === uri);
      seen.shown = !!img && img.complete && img.naturalWidth > 0;
      seen.size = seen.shown ? [img.naturalWidth, img.naturalHeight] : null;
      const canvas = seen.shown ? drawn(img) : null;
      seen.pixel_std = canvas ? pixelStd(canvas) : null;
      seen.png = canvas ? canvas.toDataURL("image/png") : null;  // the screenshot kept
      seen.home_gone = !document.querySelector("#app .title");
      seen.text = appText();
    });
  }
  const pre = document.createElement("pre");
  pre.id = "tour";
  pre.textContent = JSON.stringify(tour);
  document.body.appendChild(pre);
  document.title = "tour done";
})();
"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (scripts/install-chromium.sh installs it where root and apt allow)."""
    proc = subprocess.run(
        ["bash", str(PROJECT / "scripts/install-chromium.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    require(proc.returncode == 0, f"no chromium for the browser test: {proc.stderr[-300:]}")
    return proc.stdout.strip().splitlines()[-1]


def chromium_run(chromium: str, page, profile, *args: str, budget_ms: int) -> str:
    """Chromium on `page` with its virtual-time budget; its stdout."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--virtual-time-budget={budget_ms}"]
    cmd += [f"--user-data-dir={profile}", *args, page.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def not_blank(png) -> float:
    """Grey-level standard deviation of a screenshot."""
    return float(np.asarray(Image.open(png).convert("L"), float).std())


@pytest.fixture(scope="module")
def tour(chromium, report_html, tmp_path_factory) -> dict:
    """What the tour recorded: `home` and, per figure suffix, what was shown."""
    figures = json.dumps([[category, "/" + suffix.lstrip("/")] for category, suffix, *_ in FIGURES])
    head, body_end, tail = report_html.read_text().rpartition("</body>")  # the page's own, last
    assert body_end, f"{report_html}: no </body>"
    root = tmp_path_factory.mktemp("tour")
    page = root / "tour.html"
    script = TOUR_JS.replace("__FIGURES__", figures)
    page.write_text(head + "<script>" + script + "</script>\n" + body_end + tail)
    budget = 2000 + 2500 * len(FIGURES)
    dom = chromium_run(chromium, page, root / "profile", "--dump-dom", budget_ms=budget)
    assert "<title>tour done</title>" in dom, dom[dom.find("<title>") :][:80]
    record = dom[dom.index('<pre id="tour">') + len('<pre id="tour">') :]
    tour = json.loads(html.unescape(record[: record.index("</pre>")]))
    tour["shots"] = root / "shots"
    for suffix, seen in tour["figures"].items():
        if seen.get("png"):
            keep_shot(
                tour["shots"],
                shot_name(suffix),
                base64.b64decode(seen.pop("png").removeprefix("data:image/png;base64,")),
            )
    return tour


def shot_name(suffix: str) -> str:
    """'membership/roc/balanced.svg' -> 'membership_roc_balanced.png'."""
    return suffix.strip("/").removesuffix(".svg").replace("/", "_") + ".png"


def keep_shot(folder, name: str, png: bytes) -> None:
    """A screenshot into `folder` and, when DPSCALE_SHOTS names a folder, a copy there: the
    figures as the browser shows them, for a person to look at after the run."""
    for where in filter(None, (folder, os.environ.get("DPSCALE_SHOTS"))):
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / name).write_bytes(png)


def test_report_opens_on_the_workflow_page(chromium, report_html, tour, demo, tmp_path):
    home = tour["home"]
    assert home["title"] == HOME_HEADING
    assert f"experiment {demo.cfg['experiment']}" in home["text"]
    assert f"δ = {demo.cfg['privacy']['delta']:g}" in home["text"]
    for category in CATEGORIES:
        assert category in home["text"], category
    assert home["loading_screen_visible"] is False, "the loading screen still covers the page"
    # The page as a reader sees it first: rendered, not blank.
    shot = tmp_path / "home.png"
    chromium_run(chromium, report_html, tmp_path / "profile", f"--screenshot={shot}",
                 budget_ms=10000)  # fmt: skip
    assert shot.exists() and not_blank(shot) > 10
    keep_shot(tour["shots"], "home.png", shot.read_bytes())


@pytest.mark.parametrize(
    ("category", "suffix", "caption", "labels"), FIGURES, ids=[f[1] for f in FIGURES]
)
def test_report_shows_each_figure_family(tour, category, suffix, caption, labels):
    suffix = "/" + suffix.lstrip("/")
    seen = tour["figures"][suffix]
    assert seen["found"], f"no result ending in {suffix} in the report"
    assert seen["shown"], "the figure's image did not load"
    # The figure replaced the rendered workflow page.
    assert seen["home_gone"]
    assert suffix.rsplit("/", 1)[-1] in seen["text"]  # the file's name in the info panel
    assert caption in seen["text"]
    for value in labels:
        assert value in seen["text"], value
    width, height = seen["size"]
    assert width > 200 and height > 150, seen["size"]
    assert seen["pixel_std"] > 10, "the figure is (nearly) blank"
    shot = tour["shots"] / shot_name(suffix)  # the browser's rendering, kept to look at
    assert Image.open(shot).size == (2 * width, 2 * height)
