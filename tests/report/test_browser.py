"""The Snakemake report of a tiny real run, opened in headless Debian chromium: the page and
one figure of every family render (screenshots not blank), with their names, captions and labels.

The report is one HTML file whose React app renders from embedded data, so each figure is shown
by a copy of the report with a few lines of script appended that do what a reader's clicks do
(`app.showCategory`, then the result's view and info buttons).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT

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
    "--virtual-time-budget=10000",
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


# What a reader's clicks do, one view change per tick: App.setView merges into the state of the
# last render, so two calls in one tick would undo each other. The title reports the outcome.
DRIVER_JS = """
const step = (delay, action) =>
  new Promise((done) => setTimeout(() => done(action()), delay));
(async function () {
  const path = await step(500, () =>
    Object.keys(results).find((p) => ("/" + p).endsWith(__SUFFIX__)));
  if (path === undefined) { document.title = "missing result"; return; }
  const uri = results[path].data_uri;
  await step(300, () => app.showCategory(__CATEGORY__));
  await step(300, () => app.showResultInfo(path));
  await step(300, () => app.setView({content: "img", contentPath: uri, resultPath: path}));
  await step(1000, () => {
    const img = Array.from(document.images).find((i) => i.getAttribute("src") === uri);
    document.title = img && img.complete && img.naturalWidth > 0
      ? "figure shown " + img.naturalWidth + "x" + img.naturalHeight : "figure not shown";
  });
})();
"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by scripts/install-chromium.sh when missing (CI)."""
    proc = subprocess.run(
        ["bash", str(PROJECT / "scripts/install-chromium.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def browse(chromium: str, page, tmp_path, screenshot=None) -> str:
    """The DOM after the page's scripts ran (and a screenshot if asked)."""
    profile = tmp_path / "chromium-profile"
    args = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        shot = subprocess.run(
            [*args, f"--screenshot={screenshot}", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
        shutil.rmtree(profile, ignore_errors=True)
    dom = subprocess.run(
        [*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    shutil.rmtree(profile, ignore_errors=True)
    return dom.stdout


def not_blank(png, box=None) -> float:
    """Grey-level standard deviation of the screenshot (or of a box of it)."""
    image = Image.open(png).convert("L")
    if box is not None:
        image = image.crop(box)
    return float(np.asarray(image, float).std())


def driver_page(report, tmp_path, category: str, suffix: str):
    """A copy of the report that opens one result the way a reader's clicks would."""
    wanted = json.dumps("/" + suffix.lstrip("/"))  # a whole path component: a/b.svg, not ab.svg
    script = DRIVER_JS.replace("__SUFFIX__", wanted).replace("__CATEGORY__", json.dumps(category))
    head, body_end, tail = report.read_text().rpartition("</body>")  # the page's own, last
    assert body_end, f"{report}: no </body>"
    page = tmp_path / f"{suffix.strip('/').replace('/', '_')}.html"
    page.write_text(head + "<script>" + script + "</script>\n" + body_end + tail)
    return page


def test_report_opens_on_the_workflow_page(chromium, report_html, tmp_path):
    shot = tmp_path / "home.png"
    dom = browse(chromium, report_html, tmp_path, screenshot=shot)
    assert f'class="title">{HOME_HEADING}' in dom
    assert "experiment <strong>tiny</strong>" in dom
    assert "δ = 1e-05" in dom
    for category in CATEGORIES:
        assert category in dom, category
    assert "Loading Snakemake Report" not in dom or 'style="display: none;"' in dom
    assert not_blank(shot) > 10


@pytest.mark.parametrize(
    ("category", "suffix", "caption", "labels"), FIGURES, ids=[f[1] for f in FIGURES]
)
def test_report_shows_each_figure_family(
    chromium, report_html, tmp_path, category, suffix, caption, labels
):
    page = driver_page(report_html, tmp_path, category, suffix)
    shot = tmp_path / "figure.png"
    dom = browse(chromium, page, tmp_path, screenshot=shot)
    assert "<title>figure shown " in dom, dom[dom.find("<title>") :][:80]
    # The figure replaced the rendered workflow page (its text stays in an embedded script).
    assert f'class="title">{HOME_HEADING}' not in dom
    assert suffix.rsplit("/", 1)[-1] in dom  # the file's name in the info panel
    assert caption in dom
    for value in labels:
        assert value in dom, value
    # The figure sits right of the navbar: that part of the screenshot must not be blank.
    width, height = Image.open(shot).size
    assert not_blank(shot, (width // 3, 0, width, height)) > 10
