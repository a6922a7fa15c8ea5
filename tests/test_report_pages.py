"""What a reader opens: index.html and the figures in the reports, checked as HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from bs4 import BeautifulSoup  # noqa: E402

from fedtune_core.study import grid, index_page, plots, report, verdicts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The findings' verdicts, in an order unlike the marks' table; the first is yet unknown.
VERDICTS = ["partly supported", verdicts.INCONCLUSIVE, verdicts.SUPPORTED,
            report.NOT_MEASURABLE_HERE, verdicts.NOT_SUPPORTED]


def _table() -> pd.DataFrame:
    return pd.DataFrame([
        {"finding": f"F{i}", "claim": f"Claim **{i}** holds.", "verdict": verdict,
         "evidence": f"a {i} < b <script>x</script>", "report": "01_tuning_methods"}
        for i, verdict in enumerate(VERDICTS)])


def _tiny_png(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(path, dpi=20)
    plt.close(fig)


@pytest.fixture
def index(tmp_path) -> BeautifulSoup:
    """index.html of a results folder with two reports, three known figures and a stray one."""
    (tmp_path / "reports").mkdir()
    (tmp_path / "figures").mkdir()
    for name in ("00_summary", "01_tuning_methods"):
        (tmp_path / "reports" / f"{name}.html").write_text("<html></html>")
    for name in ("01_pareto_parameters", "01_accuracy_per_round", "04_global_test", "extra"):
        _tiny_png(tmp_path / "figures" / f"{name}.png")
    profile = grid.load_profile("smoke")
    path = index_page.write_index(tmp_path, profile, _table())
    return BeautifulSoup(path.read_text(), "html.parser")


def test_index_renders_markdown_and_escapes_raw_html(index):
    text = index.get_text()
    assert "**" not in text
    assert index.select_one(".description strong").get_text() == "smoke"
    claims = [td.select_one("strong").get_text() for td in index.select("td.col-claim")]
    assert claims == [str(i) for i in range(len(VERDICTS))]
    assert not index.select("script")  # raw HTML in a cell is shown as text, not run
    assert "<script>x</script>" in index.select_one("td.col-evidence").get_text()


def test_index_marks_every_verdict_with_symbol_colour_and_word(index):
    cells = index.select("td.col-verdict .verdict")
    assert [c.get_text() for c in cells] == [f"{report.mark(v)[0]}{v}" for v in VERDICTS]
    classes = [c["class"][1] for c in cells]
    assert classes == ["v-other", "v-inconclusive", "v-supported", "v-not-measurable",
                       "v-not-supported"]
    assert all(c.select_one(".mark")["aria-hidden"] == "true" for c in cells)
    assert [m.get_text() for m in index.select("td.col-verdict .mark")] == list("•≈✔–✘")
    tally = [t.get_text() for t in index.select(".tally .verdict")]  # known ones first
    assert tally == ["✔supported: 1", "✘not supported: 1", "≈inconclusive: 1",
                     "–not measurable in this profile: 1", "•partly supported: 1"]


def test_index_shows_every_figure_as_a_captioned_thumbnail(index):
    cards = index.select("figure.card")
    known = [n for n in plots.FIGURES if n in {"01_pareto_parameters", "01_accuracy_per_round",
                                                "04_global_test"}]
    assert [c["id"] for c in cards] == [f"fig-{n}" for n in [*known, "extra"]]
    for card, name in zip(cards, [*known, "extra"], strict=True):
        img = card.select_one("img")
        assert img["src"] == f"figures/{name}.png"
        assert img.find_parent("a")["href"] == f"figures/{name}.png"
        info = plots.FIGURES.get(name)
        assert img["alt"] == (info.alt if info else f"Figure {name}")
        assert card.select_one("figcaption span").get_text() == (info.caption if info else name)
    links = {a["href"] for a in cards[0].select("figcaption a")}
    assert "reports/01_tuning_methods.html#fig-01_accuracy_per_round" in links
    # 04_fl_vs_local.html does not exist: no link to it
    assert not [a for a in index.select("a") if "04_fl_vs_local" in a["href"]]


def test_index_links_reports_and_needs_no_network(index):
    nav = [a["href"] for a in index.select("nav.reports a")]
    assert nav == ["reports/00_summary.html", "reports/01_tuning_methods.html"]
    page = str(index)
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_figure_table_matches_the_notebooks():
    saved = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for name in re.findall(r"plots\.save\([^)]*?[\"'](\w+)[\"']\)", source):
            saved[name] = path.stem
    assert saved == {name: info.report for name, info in plots.FIGURES.items()}
    assert all(len(i.caption) <= 120 and "\n" not in i.caption for i in plots.FIGURES.values())


def test_save_writes_png_and_pdf_and_refuses_an_unknown_name(tmp_path, capsys):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    plots.save(fig, tmp_path, "03_few_shot")
    assert {p.name for p in tmp_path.iterdir()} == {"03_few_shot.png", "03_few_shot.pdf"}
    assert capsys.readouterr().out == ""  # outside a notebook it shows nothing
    with pytest.raises(ValueError, match="unknown figure 'nope'.*03_few_shot"):
        plots.save(fig, tmp_path, "nope")
    plt.close(fig)


def test_figure_html_carries_alt_text_caption_and_anchor(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.plot([0, 1])
    plots.save(fig, tmp_path, "02_clip_vs_vit")
    plt.close(fig)
    info = plots.FIGURES["02_clip_vs_vit"]
    png = (tmp_path / "02_clip_vs_vit.png").read_bytes()
    soup = BeautifulSoup(plots.figure_html(png, "02_clip_vs_vit", info), "html.parser")
    img = soup.select_one("figure#fig-02_clip_vs_vit img")
    assert img["alt"] == info.alt
    assert img["src"].startswith("data:image/png;base64,")
    assert 350 <= int(img["width"]) <= 400  # 4 inches at 100 pixels per inch, cropped tight
    assert soup.select_one("figcaption").get_text() == info.caption
