"""The evaluation report: names and errors from the user's files must come out as written,
not as Markdown (a ``|`` in a file name would split a table row) nor as HTML."""

from __future__ import annotations

import html
from pathlib import Path

from markdown_it import MarkdownIt

from service.local.evaluate.report import Report, Row, render_html, render_markdown

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
        thumbnails=[(AWKWARD[0], tmp_path / "missing.png")],
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
