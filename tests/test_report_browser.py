"""The report of a real ``compare`` run, opened in headless Chromium (Debian's ``chromium``).

The test starts the browser itself (``--headless --no-sandbox --disable-gpu
--disable-background-networking`` and a fresh profile), drives it over the DevTools protocol on
a pipe (:mod:`tests.chromium`) and checks that every image decoded with a non-zero size, that
no load failed, that nothing but the page's own file was requested, and that no error was
logged. A full-page screenshot is written to the compare directory as ``report.png``. The
negative tests show that the same check fails on a broken, a missing and an external image.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import pytest

from manytask.cli import main
from manytask.evaluate.report import write_report

from .chromium import CHROMIUM, Browser
from .tiny_compare import write_config

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; `make browser` as root)",
)

AFFINITY = {
    "tasks": ["y1", "y2"],
    "lookahead": [[0.12, 0.04], [-0.02, 0.1]],
    "cosine": [[1.0, 0.3], [0.3, 1.0]],
    "conflict": [[0.0, 0.25], [0.25, 0.0]],
    "measurements": 4,
}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("chromium")
    with Browser(folder / "profile", folder / "chromium.log") as running:
        yield running


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two methods, one seed, one epoch; the affinity summary is added by hand (the monitor that
    measures it is not part of this test), then the report is written again."""
    folder = tmp_path_factory.mktemp("compare")
    path = write_config(folder / "c.yaml", folder / "runs")
    assert main(["compare", str(path), "--methods", "ew,uw", "--seeds", "1", "--quiet"]) == 0
    root = folder / "runs" / "tiny-compare"
    assert (root / "report.html").exists()  # compare wrote it already
    summary_path = root / "uw" / "seed-1" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "affinity": AFFINITY}))
    assert main(["report", str(root)]) == 0
    return root


def test_every_plot_of_the_compare_report_renders_in_chromium(browser: Browser, compare_dir):
    page = compare_dir / "report.html"
    check = browser.inspect(page)
    (compare_dir / "report.png").write_bytes(check.screenshot)

    assert check.problems() == []
    plots = sorted((compare_dir / "plots").glob("*.png"))
    assert [p.stem for p in plots] == ["affinity", "learning-curves", "pareto", "weights"]
    assert len(check.images) == len(plots)
    assert [image["alt"] for image in check.images] == [
        "Pareto plot of y1, y2",
        "training loss and validation primary metric per epoch, per task",
        "task weights per epoch",
        "inter-task affinity heat maps",
    ]
    for image in check.images:
        assert image["complete"] and image["width"] > 200 and image["height"] > 100, image
    # only the page itself came from a file; everything else was inline
    assert [u for u in check.requests if not u.startswith("data:")] == [page.as_uri()]
    assert check.title.startswith("manytask report")
    width, height = png_size((compare_dir / "report.png").read_bytes())
    assert width == 1280 and height > 1500  # the whole page, not only the first screen


def test_a_broken_cut_or_missing_image_fails_the_check(
    browser: Browser, compare_dir, tmp_path: Path
):
    whole = (compare_dir / "plots" / "pareto.png").read_bytes()
    cut = base64.b64encode(whole[: len(whole) // 2]).decode()  # header intact, rows missing
    good = base64.b64encode(whole).decode()
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title></head><body>"
        '<img src="data:image/png;base64,iVBORw0KGgoAAAAN" alt="garbage">'
        f'<img src="data:image/png;base64,{cut}" alt="cut">'
        '<img src="missing.png" alt="absent file">'
        f'<img src="data:image/png;base64,{good}" alt="good">'
        "</body></html>"
    )
    check = browser.inspect(page)
    assert [i["alt"] for i in check.broken_images] == ["garbage", "cut", "absent file"]
    cut_image = check.broken_images[1]
    assert cut_image["width"] == png_size(whole)[0] and cut_image["transparent"] > 0
    assert any("ERR_FILE_NOT_FOUND" in failure for failure in check.failed), check.failed
    assert sum(p.startswith("image did not render") for p in check.problems()) == 3


def test_an_external_image_in_the_report_is_blocked_and_reported(
    browser: Browser, compare_dir, tmp_path: Path
):
    text = (compare_dir / "report.html").read_text(encoding="utf-8")
    tampered = tmp_path / "tampered.html"
    tampered.write_text(
        re.sub("</body>", '<img src="http://example.invalid/x.png" alt="remote"></body>', text)
    )
    check = browser.inspect(tampered)
    problems = "\n".join(check.problems())
    assert "image did not render" in problems and "'alt': 'remote'" in problems
    assert "http://example.invalid/x.png" in problems  # requested (and blocked by the CSP)
    assert all(i["width"] > 0 for i in check.images if i["alt"] != "remote")


def test_report_of_a_single_train_run_renders_too(browser: Browser, compare_dir, tmp_path):
    out = write_report([compare_dir / "ew" / "seed-1"], tmp_path / "single.html")
    check = browser.inspect(out)
    assert check.problems() == []
    assert len(check.images) == 2  # learning curves and weights; no Pareto, no affinity
