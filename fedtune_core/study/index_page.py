"""``<results>/index.html``: the findings with a mark per verdict, every figure, the reports.

Rendered from ``templates/index.html.j2`` (Jinja, autoescaped; Markdown through mistune with
raw HTML escaped), self-contained (no network needed), written atomically.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jinja2
import mistune
import pandas as pd
from markupsafe import Markup

from fedtune_core import files
from fedtune_core.study import plots, verdicts
from fedtune_core.study.profile import Profile
from fedtune_core.study.report import EFFECT, NOTEBOOKS, VERDICT_MARKS, absent_notice, mark

_MARKDOWN = mistune.create_markdown(escape=True, plugins=["table", "strikethrough"])
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("fedtune_core.study", "templates"),
                                autoescape=True, keep_trailing_newline=True)


def markdown_html(text: str) -> Markup:
    """Markdown rendered to HTML (raw HTML in ``text`` is escaped, not passed through)."""
    return Markup(_MARKDOWN(text))


def write_index(folder: str | os.PathLike, profile: Profile, table: pd.DataFrame,
                absent: Sequence[tuple] = ()) -> Path:
    """``<folder>/index.html``: the findings with a mark per verdict, every figure, the reports.

    Generic over the rows and columns of ``table`` (:func:`~fedtune_core.study.report.findings`)
    and over verdict strings (:func:`~fedtune_core.study.report.mark`). Figures are the PNGs in
    ``<folder>/figures``, shown as thumbnails with their caption from
    :data:`fedtune_core.study.plots.FIGURES`, each linking to its full size and to its place in
    its report. Self-contained: no network needed. ``absent``, the runs the profile plans
    without a valid record (``(config, why)``, see :func:`fedtune_core.study.grid.absent`), are
    named at the top (:func:`~fedtune_core.study.report.absent_notice`).
    """
    folder = Path(folder)
    reports = [{"name": n, "title": t} for n, t in NOTEBOOKS.items()
               if (folder / "reports" / f"{n}.html").exists()]
    notice = absent_notice(absent)
    page = _TEMPLATES.get_template("index.html.j2").render(
        profile=profile.name, description=markdown_html(profile.description), reports=reports,
        absent=markdown_html(notice) if notice else "",
        rehearsal=(profile.rehearsal or {}).get("of"),
        columns=list(table.columns), rows=[_cells(row) for row in table.to_dict("records")],
        tally=_tally(table), rules=markdown_html(verdicts.RULES),
        figures=_figures(folder, {r["name"] for r in reports}))
    path = folder / "index.html"
    files.write_text(path, page)
    return path


def _cells(row: dict) -> list[tuple[str, Markup]]:
    """(column, HTML) per cell: the verdict as a mark, the report as a link, text as Markdown."""
    cells = []
    for column, value in row.items():
        if column == "verdict":
            symbol, css = mark(value)
            cell = Markup('<span class="verdict v-{}"><span class="mark" aria-hidden="true">{}'
                          '</span>{}</span>').format(css, symbol, value)
        elif column == EFFECT:
            cell = Markup("<br>").join(str(value).splitlines())  # each line escaped
        elif column == "report":
            cell = Markup('<a href="reports/{0}.html">{1}</a>').format(
                value, NOTEBOOKS.get(value, value))
        else:
            cell = markdown_html(str(value))
        cells.append((column, cell))
    return cells


def _tally(table: pd.DataFrame) -> list[dict]:
    """How many findings got each verdict: known verdicts in table order, then the others."""
    counts = Counter(table["verdict"]) if "verdict" in table else Counter()
    order = list(VERDICT_MARKS)
    ranked = sorted(counts, key=lambda v: order.index(v) if v in order else len(order))
    return [{"verdict": v, "count": counts[v], "symbol": mark(v)[0], "css": mark(v)[1]}
            for v in ranked]


def _figures(folder: Path, reports: set[str]) -> list[dict]:
    """The saved figures: those of :data:`plots.FIGURES` in its order, then any others."""
    pngs = {p.stem for p in (folder / "figures").glob("*.png")}
    names = [n for n in plots.FIGURES if n in pngs] + sorted(pngs - set(plots.FIGURES))
    out = []
    for name in names:
        info = plots.FIGURES.get(name, plots.FigureInfo("", name, f"Figure {name}"))
        out.append({"name": name, "caption": info.caption, "alt": info.alt,
                    "pdf": (folder / "figures" / f"{name}.pdf").exists(),
                    "report": info.report if info.report in reports else "",
                    "report_title": NOTEBOOKS.get(info.report, info.report)})
    return out
