"""The evaluation report: names and errors from the user's files must come out as written,
not as Markdown (a ``|`` in a file name would split a table row) nor as HTML; numbers never as
``-0.0000``; the times said to leave out the warm-up; each thumbnail captioned with its image."""

from __future__ import annotations

import html
from pathlib import Path

from markdown_it import MarkdownIt
from PIL import Image

from service.engine.pictures.overlays import NOT_SEEN_LEGEND
from service.local.evaluate.report import (
    MapThumbnail,
    Report,
    Row,
    fixed,
    render_html,
    render_markdown,
)

#: Names a folder can hold, each a different way to break Markdown if written unescaped.
AWKWARD = [
    "we|rd `name`.png",
    "_under_ *star* [link](x).png",
    "- a list.png",
    "1. numbered.png",
    "# heading.png",
    " spaced .png",
    "<b>tag</b> &amp; back\\slash.png",
]


def _report(tmp_path: Path) -> Report:
    row = Row(
        layer="layer|4",
        method="grad`cam",
        images=3,
        values={"drop": 0.25},
        explain_ms=1.0,
        scores_ms=2.0,
        thumbnails=[MapThumbnail(AWKWARD[0], tmp_path / "missing.png")],
    )
    return Report(
        model="m|odel",
        architecture="resnet18",
        random_weights=False,
        device="cpu",
        folder="ph`otos | #",
        images=10,
        evaluated=3,
        failed={name: f"cannot | read `it`\n# line two of {name}" for name in AWKWARD},
        interrupted=False,
        rank_by="drop",
        lower_is_better=["drop"],
        columns=["drop"],
        rows=[row],
        pointing_tolerance=0.0,
        command="gradcam-service evaluate 'a`b``c|d'",
    )


def shown(text: str) -> str:
    """``text`` as markdown-it writes plain text in HTML: &, <, > and " escaped."""
    return html.escape(text, quote=False).replace('"', "&quot;")


def test_markdown_shows_names_errors_and_the_command_as_written(tmp_path: Path) -> None:
    report = _report(tmp_path)
    page = MarkdownIt("commonmark").enable("table").render(render_markdown(report))
    assert f"<h1>Grad-CAM evaluation: {shown('m|odel')} (resnet18) on ph`otos | #</h1>" in page
    cells = page.split("<tbody>")[1].split("</tbody>")[0]
    assert cells.count("<td>") == 7  # rank, layer, method, images, drop, two times
    assert f"<td>{shown('layer|4')}</td>" in cells
    assert "<td>grad`cam</td>" in cells
    for name in AWKWARD:
        why = f"cannot | read `it` # line two of {name}"
        assert f"<li>{shown(name)}: {shown(why)}</li>" in page
    assert f"<li>command: <code>{shown(report.command)}</code></li>" in page
    assert page.count("<h1>") == 1
    assert page.count("<ol") == 0
    assert page.count("<ul>") == 3  # facts, columns, skipped images: no nested lists


def test_html_escapes_names_errors_and_the_command(tmp_path: Path) -> None:
    report = _report(tmp_path)
    page = render_html(report)
    for name in AWKWARD:
        assert html.escape(name) in page
    assert "<b>tag</b>" not in page
    assert f"<code>{html.escape(report.command)}</code>" in page
    assert f'<td class="name">{html.escape("grad`cam")}</td>' in page


def test_numbers_that_round_to_zero_are_written_without_a_minus_sign(tmp_path: Path) -> None:
    report = _report(tmp_path)
    report.columns = ["drop", "increase", "road"]
    report.rows[0].values = {"drop": -0.0, "increase": -1e-9, "road": -0.00004}
    report.rows[0].explain_ms = -0.0
    report.rows[0].scores_ms = -1e-9
    report.pointing_tolerance = -0.0
    report.columns.append("pointing_game")
    report.rows[0].values["pointing_game"] = -0.0
    markdown, page = render_markdown(report), render_html(report)
    for text in (markdown, page):
        assert "-0.0" not in text
        assert "-0 px" not in text
        assert "pointing tolerance: 0 px" in text
    assert "| 0.0000 | 0.0000 | 0.0000 | 0.0000 | 0.0 | 0.0 |" in markdown
    assert fixed(-0.25, 4) == "-0.2500"  # a real negative value keeps its sign
    assert fixed(-0.00005, 4) == "-0.0001"


def test_both_reports_say_the_times_leave_out_the_warm_up_call(tmp_path: Path) -> None:
    report = _report(tmp_path)
    for text in (render_markdown(report), render_html(report)):
        assert "after one untimed warm-up call per layer and method" in text
        assert "one-time costs" in text


def _png(path: Path) -> Path:
    Image.new("RGB", (8, 4), (200, 10, 10)).save(path)
    return path


def test_html_captions_each_thumbnail_with_its_image_and_the_pointing_game(
    tmp_path: Path,
) -> None:
    report = _report(tmp_path)
    report.rows[0].thumbnails = [
        MapThumbnail("cats/tabby.png", _png(tmp_path / "a.png"), pointing=True),
        MapThumbnail("dog & co.png", _png(tmp_path / "b.png"), pointing=False),
        MapThumbnail("unlabelled.png", _png(tmp_path / "c.png")),
    ]
    page = render_html(report)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    figures = page.split('<div class="thumbs">')[1].split("</div>")[0]
    assert figures.count("<figure>") == 3
    assert "<figcaption>cats/tabby.png<br>" in figures
    assert '<span class="hit">pointing game: hit</span>' in figures
    assert "<figcaption>dog &amp; co.png<br>" in figures
    assert '<span class="miss">pointing game: miss</span>' in figures
    assert "<figcaption>unlabelled.png</figcaption>" in figures
    assert "White boxes: the labelled object" in page
    # The maps are not a column of the table, where they pushed it past a laptop's width.
    table = page.split("<table>")[1].split("</table>")[0]
    assert "data:image" not in table
    assert "maps" not in table


def test_the_hatching_legend_is_shown_only_when_a_thumbnail_has_a_cropped_border(
    tmp_path: Path,
) -> None:
    report = _report(tmp_path)
    report.rows[0].thumbnails = [MapThumbnail("square.png", _png(tmp_path / "a.png"))]
    assert NOT_SEEN_LEGEND not in render_html(report)
    report.rows[0].thumbnails.append(
        MapThumbnail("wide.png", _png(tmp_path / "b.png"), cropped=True)
    )
    assert NOT_SEEN_LEGEND in render_html(report)
