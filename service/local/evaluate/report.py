"""The evaluation report: a Markdown table, and a self-contained HTML page with thumbnails."""

from __future__ import annotations

import base64
import datetime
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.faithfulness.scores import SCORE_DESCRIPTIONS
from service.engine.pictures.overlays import NOT_SEEN_LEGEND
from service.local.evaluate.thumbnails import THUMBNAIL_SIDE

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"

_COLUMN_DOC: dict[str, str] = {
    "pointing_game": "share of the labelled images whose map peaks on the object",
    "energy_in_box": "mean share of the map's sum that lies on the object",
    **{str(name): text for name, text in SCORE_DESCRIPTIONS.items()},
}
#: How the times are measured, said under the table in both formats.
TIMES_NOTE = (
    "Means over the images; times are medians per image, measured after one untimed warm-up"
    " call per layer and method: the first call's one-time costs (loading kernels, allocating"
    " memory) are excluded."
)
#: What the thumbnails show, said above them in report.html.
MAPS_LEGEND = (
    "Each map over its image, the image's name under it. White boxes: the labelled object,"
    " its class above; circled cross: the map's peak, the point the pointing game checks"
    " (hit: on the object, within the pointing tolerance)."
)


@dataclass(frozen=True)
class MapThumbnail:
    """One image's map by a (layer, method), as a PNG file, and what it shows."""

    image: str  # the image's name, relative to the folder
    path: Path
    pointing: bool | None = None  # the pointing game's result; None: no boxes or mask
    cropped: bool = False  # part of the image was not seen by the model (drawn hatched)


@dataclass
class Row:
    """One (layer, method), averaged over the images."""

    layer: str
    method: str
    images: int
    values: dict[str, float | None]
    explain_ms: float  # median per image
    scores_ms: float
    thumbnails: list[MapThumbnail] = field(default_factory=list)


@dataclass
class Report:
    model: str
    architecture: str
    random_weights: bool
    device: str
    folder: str
    images: int
    evaluated: int
    failed: dict[str, str]
    interrupted: bool
    rank_by: str | None
    lower_is_better: list[str]
    columns: list[str]
    rows: list[Row]  # ranked, best first
    pointing_tolerance: float
    command: str = ""
    date: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )


def write_reports(output: Path, report: Report) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``output``; return their paths."""
    output.mkdir(parents=True, exist_ok=True)
    markdown = output / MARKDOWN_FILE
    page = output / HTML_FILE
    markdown.write_text(render_markdown(report), encoding="utf-8")
    page.write_text(render_html(report), encoding="utf-8")
    return markdown, page


#: Characters that open or close Markdown inline syntax (code, emphasis, links, HTML, entities,
#: strikethrough) or end a table cell; an underscore only where it can delimit emphasis, that is
#: not between two letters or digits (``pointing_game`` stays as it is).
_MD_INLINE = re.compile(r"([\\`*\[\]<>|~&])|(?<![^\W_])_|_(?![^\W_])")
_LINE_BREAK = re.compile(r"\r\n|[\r\n\v\f\x85\u2028\u2029]")


def md_text(text: str) -> str:
    """``text`` (a file name, an error) as literal Markdown in a table cell, a list item or a
    heading: a ``|`` would split the cell, a backtick or ``*`` would start code or emphasis, a
    leading ``-`` or ``1.`` a nested list, a trailing ``#`` would close a heading, a line break
    would end the row; and the spaces Markdown strips from either end are kept as character
    references."""
    escaped = _MD_INLINE.sub(lambda m: "\\" + m.group(0), _LINE_BREAK.sub(" ", text))
    # What opens a block at the start of a list item: a heading or a list, markers followed
    # by a space or nothing (-0.25 stays as it is); a rule of three dashes.
    escaped = re.sub(r"^([#+-])(?=\s|$)|^(?=(?:-\s*){3,}$)", r"\\\1", escaped)
    escaped = re.sub(r"^(\d{1,9})([.)])(?=\s|$)", r"\1\\\2", escaped)  # a numbered list
    escaped = re.sub(r"(?<!\\)#$", r"\\#", escaped)  # a heading's closing sequence
    core = escaped.strip()
    lead = escaped[: len(escaped) - len(escaped.lstrip())]
    trail = escaped[len(lead) + len(core) :]
    return "".join(f"&#{ord(c)};" for c in lead) + core + "".join(f"&#{ord(c)};" for c in trail)


def md_code(text: str) -> str:
    """``text`` as one Markdown code span, whatever backticks it holds: fenced by a longer run
    of backticks than any inside, padded where it starts or ends with one."""
    flat = _LINE_BREAK.sub(" ", text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", flat)), default=0) + 1)
    pad = " " if flat[:1] in ("`", " ") or flat[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


def _title(report: Report, text: Callable[[str], str]) -> str:
    """The heading, its parts from the user (model, folder) escaped by ``text``."""
    return (
        f"Grad-CAM evaluation: {text(report.model)} ({text(report.architecture)})"
        f" on {text(report.folder)}"
    )


def _facts(report: Report) -> list[tuple[str, str]]:
    """The report's facts, each as (plain text, code): the code (the command, empty for
    others) is set apart by each format its own way."""
    facts = [
        (f"{report.evaluated} of {report.images} images evaluated on {report.device}", ""),
        (f"date: {report.date}", ""),
    ]
    if report.interrupted:
        facts.insert(0, ("INTERRUPTED: run the same command again to carry on from here", ""))
    if report.command:
        facts.append(("command:", report.command))
    if report.rank_by:
        direction = "lower" if report.rank_by in report.lower_is_better else "higher"
        facts.append((f"ranked by {report.rank_by} ({direction} is better)", ""))
    if "pointing_game" in report.columns:
        facts.append((f"pointing tolerance: {_plain(report.pointing_tolerance)} px", ""))
    if report.random_weights:
        facts.append(("WARNING: the model has RANDOM weights; these results are meaningless", ""))
    if report.failed:
        facts.append((f"{len(report.failed)} images skipped (listed at the end)", ""))
    return facts


def fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, never a negative zero: a value that rounds to zero
    (-0.0, -1e-9) is written ``0.0000``, not ``-0.0000``, which reads as a measure below zero."""
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def _plain(value: float) -> str:
    """``value`` as short as it reads (``4``, ``2.5``), never a negative zero."""
    return f"{value + 0.0:g}"  # -0.0 + 0.0 is 0.0


def _cell(value: float | None) -> str:
    return "n/a" if value is None else fixed(value, 4)


def _header(report: Report) -> list[str]:
    return [
        "rank",
        "layer",
        "method",
        "images",
        *report.columns,
        "explain ms/image",
        "scores ms/image",
    ]


def _cells(rank: int, row: Row, report: Report) -> list[str]:
    return [
        str(rank),
        row.layer,
        row.method,
        str(row.images),
        *(_cell(row.values.get(column)) for column in report.columns),
        fixed(row.explain_ms, 1),
        fixed(row.scores_ms, 1),
    ]


def render_markdown(report: Report) -> str:
    """The report as Markdown; every name and error from the user's files is escaped."""
    lines = [f"# {_title(report, md_text)}", ""]
    lines += [
        f"- {md_text(text)}{f' {md_code(code)}' if code else ''}" for text, code in _facts(report)
    ]
    header = _header(report)
    lines += ["", "| " + " | ".join(map(md_text, header)) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(report.rows, 1):
        lines.append("| " + " | ".join(map(md_text, _cells(rank, row, report))) + " |")
    lines += ["", f"Columns. {TIMES_NOTE}", ""]
    lines += [f"- `{column}`: {_COLUMN_DOC.get(column, column)}" for column in report.columns]
    if report.failed:
        lines += ["", "Skipped images:", ""]
        lines += [
            f"- {md_text(name)}: {md_text(why)}" for name, why in sorted(report.failed.items())
        ]
    return "\n".join(lines) + "\n"


_STYLE = f"""
*, *::before, *::after {{ box-sizing: border-box; }}
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; padding: 0 1.5em;
  max-width: 1600px; color: #222; }}
h1 {{ font-size: 1.5em; }}
h1, li, code, figcaption {{ overflow-wrap: anywhere; }}
.scroll {{ max-width: 100%; overflow-x: auto; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: middle; }}
th {{ background: #f3f3f3; vertical-align: bottom; }}
td.name {{ text-align: left; font-family: monospace; overflow-wrap: break-word; }}
tr.best td {{ background: #eef8ee; }}
.warn {{ color: #a00; font-weight: bold; }}
h3 code {{ font-size: 1.1em; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.thumbs figure {{ margin: 0; width: {THUMBNAIL_SIDE}px; max-width: 100%; }}
.thumbs img {{ display: block; max-width: 100%; height: auto; margin: 0 auto;
  border: 1px solid #ddd; }}
.thumbs figcaption {{ font-size: 12px; text-align: center; }}
.hit {{ color: #060; }}
.miss {{ color: #a00; }}
.hatch {{ display: inline-block; width: 2.2em; height: 1em; vertical-align: middle;
  border: 1px solid #888; background: repeating-linear-gradient(45deg, #ddd 0 2px, #999 2px 8px); }}
@media (max-width: 600px) {{ body {{ padding: 0 10px; margin: 1em auto; }} }}
"""


def _data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _header_html(name: str) -> str:
    """A column's name, allowed to wrap after its underscores (``confidence_change``), so that
    the table fits a laptop's width."""
    return "_<wbr>".join(html.escape(part) for part in name.split("_"))


def _figure(thumb: MapThumbnail, uri: str) -> str:
    """One thumbnail, its image's name and the pointing game's result under it."""
    esc = html.escape
    caption = esc(thumb.image)
    if thumb.pointing is not None:
        word = "hit" if thumb.pointing else "miss"
        caption += f'<br><span class="{word}">pointing game: {word}</span>'
    return (
        f'<figure><img src="{uri}" alt="{esc(thumb.image)}" title="{esc(thumb.image)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _maps_html(report: Report) -> list[str]:
    """The thumbnails of each (layer, method), in ranking order, each pair's wrapping onto as
    many lines as the window needs; nothing where no row has any."""
    esc = html.escape
    sections: list[str] = []
    cropped = False
    for rank, row in enumerate(report.rows, 1):
        figures = []
        for thumb in row.thumbnails:
            uri = _data_uri(thumb.path)
            if uri is not None:
                figures.append(_figure(thumb, uri))
                cropped |= thumb.cropped
        if figures:
            sections.append(
                f"<section><h3>{rank}. <code>{esc(row.layer)}</code> &middot;"
                f' <code>{esc(row.method)}</code></h3><div class="thumbs">{"".join(figures)}'
                "</div></section>"
            )
    if not sections:
        return []
    legend = f"<p>{esc(MAPS_LEGEND)}"
    if cropped:
        legend += f'<br><span class="hatch"></span> {esc(NOT_SEEN_LEGEND)}'
    return ["<h2>Maps</h2>", legend + "</p>", *sections]


def render_html(report: Report) -> str:
    """One page, nothing fetched from elsewhere: thumbnails are inlined as data URIs. It reads
    at a laptop's width and on a phone: the table scrolls in its own box where it must, the
    thumbnails wrap and shrink to the window."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_title(report, esc)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_title(report, esc)}</h1><ul>",
    ]
    for text, code in _facts(report):
        css = ' class="warn"' if text.startswith(("WARNING", "INTERRUPTED")) else ""
        parts.append(f"<li{css}>{esc(text)}{f' <code>{esc(code)}</code>' if code else ''}</li>")
    parts.append('</ul><div class="scroll"><table><thead><tr>')
    parts += [f"<th>{_header_html(name)}</th>" for name in _header(report)]
    parts.append("</tr></thead><tbody>")
    for rank, row in enumerate(report.rows, 1):
        css = ' class="best"' if rank == 1 and report.rank_by else ""
        parts.append(f"<tr{css}>")
        for i, text in enumerate(_cells(rank, row, report)):
            name = ' class="name"' if i in (1, 2) else ""
            parts.append(f"<td{name}>{esc(text)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div><h2>Columns</h2><ul>")
    parts.append(f"<li>{esc(TIMES_NOTE)}</li>")
    for column in report.columns:
        parts.append(f"<li><code>{esc(column)}</code>: {esc(_COLUMN_DOC.get(column, column))}</li>")
    parts.append("</ul>")
    parts += _maps_html(report)
    if report.failed:
        parts.append("<h2>Skipped images</h2><ul>")
        for name, why in sorted(report.failed.items()):
            parts.append(f"<li>{esc(name)}: {esc(why)}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
