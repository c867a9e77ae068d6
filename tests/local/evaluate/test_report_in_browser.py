"""``report.html`` in a real headless Chromium (Playwright): readable at a laptop's 1280 px and
on a phone's 390 px, without the page scrolling sideways and with every thumbnail in view.

The report is a real one: ``gradcam-service evaluate`` on the shapes images, one of them wide
(its cropped-away ends hatched), with three layers and the default scores (the widest table).
Chromium is Debian's (``apt-get install chromium``); without it, or without the ``playwright``
package, the module is skipped, unless ``GRADCAM_TEST_REQUIRE_BROWSER=1`` makes that a failure.
``GRADCAM_TEST_CHROMIUM`` names another Chromium executable. Screenshots are saved under
``GRADCAM_TEST_ARTIFACTS`` (default: a pytest temporary folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.engine.pictures.overlays import NOT_SEEN_LEGEND

CHROMIUM = Path(os.environ.get("GRADCAM_TEST_CHROMIUM", "/usr/bin/chromium"))
REQUIRED = os.environ.get("GRADCAM_TEST_REQUIRE_BROWSER") == "1"
WIDE = "a wide photograph with a rather long file name.png"

ShapesFolder = Callable[..., tuple[Path, Path]]
RunEvaluate = Callable[..., int]


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (GRADCAM_TEST_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import Browser, ViewportSize, sync_playwright
except ImportError:
    _unavailable("the playwright package is not installed: pip install -e '.[test]'")
if not CHROMIUM.is_file():
    _unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium (or GRADCAM_TEST_CHROMIUM)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("GRADCAM_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("report-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def report(
    run_evaluate: RunEvaluate,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A report of 6 shape images and a wide one (the first shape in a 2:1 frame)."""
    folder, labels = shapes_folder(6, 31)
    entries = json.loads(labels.read_text())
    with Image.open(folder / "shape00.png") as square:
        wide = Image.new("RGB", (2 * square.width, square.height), (90, 90, 90))
        wide.paste(square, (square.width // 2, 0))
    wide.save(folder / WIDE)
    entry = dict(entries["shape00.png"])
    shift = square.width // 2
    entry["boxes"] = [[x0 + shift, y0, x1 + shift, y1] for x0, y0, x1, y1 in entry["boxes"]]
    labels.write_text(json.dumps({**entries, WIDE: entry}))
    output = tmp_path_factory.mktemp("evaluation") / "report"
    layers = [arg for layer in ("layer1", "layer2", "layer3") for arg in ("--layer", layer)]
    status = run_evaluate(shapes_models_file, folder, labels, output, *layers, "--thumbnails", "7")
    assert status == 0
    return output / "report.html"


@pytest.mark.parametrize(
    "viewport",
    [ViewportSize(width=1280, height=800), ViewportSize(width=390, height=844)],
    ids=["laptop-1280", "phone-390"],
)
def test_the_report_fits_the_window_with_every_thumbnail_in_view(
    viewport: ViewportSize, browser: Browser, report: Path, artifacts: Path
) -> None:
    context = browser.new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.goto(report.as_uri())
        layout: dict[str, Any] = page.evaluate(
            """() => {
                const table = document.querySelector(".scroll");
                const images = [...document.querySelectorAll(".thumbs img")].map((img) => {
                    const box = img.getBoundingClientRect();
                    return {left: box.left, right: box.right, width: box.width,
                            loaded: img.complete && img.naturalWidth > 0};
                });
                return {
                    page: document.documentElement.scrollWidth,
                    window: window.innerWidth,
                    table: table.scrollWidth,
                    tableBox: table.clientWidth,
                    images,
                    captions: [...document.querySelectorAll("figcaption")].map((c) => c.innerText),
                    legend: document.body.innerText,
                };
            }"""
        )
        page.screenshot(path=str(artifacts / f"report-{viewport['width']}.png"), full_page=True)
    finally:
        context.close()
    assert layout["page"] <= layout["window"], layout  # no sideways scroll of the page
    if viewport["width"] >= 1280:  # the whole table in view, no scrollbar of its own
        assert layout["table"] <= layout["tableBox"], layout
    images = layout["images"]
    assert len(images) == 3 * 7
    for image in images:
        assert image["loaded"]
        assert image["left"] >= 0, image
        assert image["right"] <= layout["window"], image
        assert image["width"] >= 0.45 * min(256, layout["window"])  # shrunk, still readable
    assert sum(WIDE in caption for caption in layout["captions"]) == 3
    assert NOT_SEEN_LEGEND in layout["legend"]
