"""The figures and tables the notebooks share, built only from run records.

Every function takes data frames from :func:`fedtune_core.runs.records.runs_frame` /
:func:`~fedtune_core.runs.records.rounds_frame` (configs read from inside the records) and
shows the mean over seeds with the spread (standard deviation) as error bars or bands.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fedtune_core import files
from fedtune_core.study import measures

DPI = 150  # of the saved PNGs; notebooks show them at 100 pixels per inch


@dataclass(frozen=True)
class FigureInfo:
    """What a saved figure is, for its report and for ``index.html``."""

    report: str  # the report (notebook) that draws it
    caption: str  # one line: what to look at
    alt: str  # what the image shows, for a reader who cannot see it


FIGURES: dict[str, FigureInfo] = {
    "01_accuracy_per_round": FigureInfo(
        "01_tuning_methods",
        "Test accuracy per round of every tuning method: which rises fastest, which ends highest.",
        "Line charts of test accuracy against communication round, one panel per model, one "
        "line per tuning method, bands for the spread over seeds."),
    "01_pre_training": FigureInfo(
        "01_tuning_methods",
        "Every method from random, weak and strong pre-training (F1: does bias rise to the top "
        "as the backbone gets stronger?).",
        "Bar chart of final test accuracy per tuning method, one bar per pre-training "
        "checkpoint (random init, weak, strong), one panel per model, error bars for the "
        "spread over seeds."),
    "01_pareto_parameters": FigureInfo(
        "01_tuning_methods",
        "Accuracy against trainable parameters: points on the dashed front are not beaten by "
        "any cheaper method.",
        "Scatter plot of final test accuracy against trainable parameters on a log axis; colour "
        "is the tuning method, marker the model, error bars the spread over seeds, a dashed "
        "line the Pareto front."),
    "01_pareto_communication": FigureInfo(
        "01_tuning_methods",
        "Accuracy against bytes communicated over the run: the cheap methods on the dashed "
        "front are the ones worth sending.",
        "Scatter plot of final test accuracy against total bytes communicated on a log axis; "
        "colour is the tuning method, marker the model, a dashed line the Pareto front."),
    "02_clip_vs_vit": FigureInfo(
        "02_clip_vs_vit",
        "CLIP next to ViT for every tuning method (F2a: CLIP's bars should stand higher); "
        "dashed: CLIP zero-shot.",
        "Bar chart of final test accuracy per tuning method, one bar per model, one panel per "
        "dataset, error bars for the spread over seeds, a dashed line at CLIP's zero-shot "
        "accuracy."),
    "03_few_shot": FigureInfo(
        "03_few_shot",
        "Accuracy against images per class per client (F2b: the flatter line is the more "
        "robust model).",
        "Line chart of final test accuracy against K training images per class per client on "
        "a log-2 axis; colour is the model, line style the tuning method."),
    "04_global_test": FigureInfo(
        "04_fl_vs_local",
        "FedAvg, local only and centralised on the global test set (F3: FedAvg should stand "
        "above local only).",
        "Bar charts of final accuracy on the global test set per data partition, one bar per "
        "training mode, one panel per model and tuning method."),
    "04_local_test": FigureInfo(
        "04_fl_vs_local",
        "The same on each client's own test split, where a local model meets data like its own.",
        "Bar charts of final accuracy on the clients' own test splits per data partition, one "
        "bar per training mode, one panel per model and tuning method."),
    "04_train_test_gap": FigureInfo(
        "04_fl_vs_local",
        "Training minus test accuracy on each client's data: a taller bar over-fits more "
        "(F3: local only should).",
        "Bar charts of training accuracy minus test accuracy on the clients' own data per "
        "partition, one bar per training mode, one panel per model and tuning method."),
    "04_accuracy_per_round": FigureInfo(
        "04_fl_vs_local",
        "Test accuracy per round of FedAvg, local only and centralised, per partition and "
        "setting.",
        "Line charts of test accuracy against communication round, one line per training "
        "mode, one panel per data partition and model / method setting."),
}


def theme() -> None:
    """The look of every figure (seaborn's whitegrid, notebook context): set by each plotting
    function when it draws, never at import."""
    sns.set_theme(style="whitegrid", context="notebook")


def figure_info(name: str) -> FigureInfo:
    """The entry of ``name`` in :data:`FIGURES`; a clear error naming the known ones."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}: add it to plots.FIGURES (report, caption, "
                         f"alt text); known figures: {', '.join(FIGURES)}")
    return FIGURES[name]


def save(fig: plt.Figure, folder: str | os.PathLike, name: str) -> None:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.pdf``; in a notebook, show it.

    ``name`` must be in :data:`FIGURES`. A notebook shows the saved PNG with its caption
    and alt text (and the figure is closed, so it is not shown a second time without them).
    """
    info = figure_info(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):  # atomically, like every file fedtune writes
        with files.staged(folder / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight", dpi=DPI)
    if _in_kernel():
        from IPython.display import display

        png = (folder / f"{name}.png").read_bytes()
        display({"text/html": figure_html(png, name, info), "text/plain": info.caption},
                raw=True)
        plt.close(fig)


def figure_html(png: bytes, name: str, info: FigureInfo) -> str:
    """A ``<figure>`` of a PNG with its alt text and caption, anchored as ``fig-<name>``."""
    width = int.from_bytes(png[16:20], "big") * 100 // DPI  # the PNG header's width
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{html.escape(name)}" style="margin:1em 0">'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(info.alt)}" '
            f'width="{width}" style="max-width:100%;height:auto">'
            f'<figcaption style="margin-top:.4em;font-style:italic">'
            f'{html.escape(info.caption)}</figcaption></figure>')


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (papermill, Jupyter): there ``save`` shows."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def summarise(runs: pd.DataFrame, by: list[str], value: str = "final_test_acc") -> pd.DataFrame:
    """Mean, standard deviation and number of seeds of ``value`` per group ``by``."""
    grouped = runs.groupby(by, sort=False, observed=True)[value]
    out = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def accuracy_curves(rounds: pd.DataFrame, hue: str = "variant", col: str = "model",
                    row: str | None = None, y: str = "test_acc") -> sns.FacetGrid:
    """Test accuracy per round, one panel per ``col``; band = spread over seeds."""
    data = rounds.dropna(subset=[y])
    theme()
    grid = sns.relplot(data=data, x="round", y=y, hue=hue, col=col, row=row, kind="line",
                       errorbar="sd", marker="o", markersize=4, height=3.2, aspect=1.2,
                       facet_kws={"sharey": True})
    grid.set_axis_labels("communication round", "test accuracy")
    _short_titles(grid)
    return grid


def _short_titles(grid: sns.FacetGrid) -> None:
    """Panel titles as bare values ("clip-tiny / bias | iid"), so they do not overlap."""
    parts = [t for names, t in ((grid.row_names, "{row_name}"), (grid.col_names, "{col_name}"))
             if names]
    if parts:
        grid.set_titles(template=" | ".join(parts))


def pareto(runs: pd.DataFrame, x: str, xlabel: str, hue: str = "variant",
           style: str = "model") -> plt.Figure:
    """Final accuracy against a cost (log scale), mean +- spread over seeds, per group."""
    table = summarise(runs, [style, hue], "final_test_acc")
    costs = runs.groupby([style, hue], sort=False)[x].mean().reset_index()
    table = table.merge(costs, on=[style, hue])
    theme()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    palette = dict(zip(table[hue].unique(), sns.color_palette(n_colors=table[hue].nunique()),
                       strict=True))
    markers = dict(zip(table[style].unique(), "osD^vP", strict=False))
    for _, r in table.iterrows():
        ax.errorbar(r[x], r["mean"], yerr=r["std"], fmt=markers[r[style]], color=palette[r[hue]],
                    capsize=3, markersize=7)
    for _, part in table.groupby(style):
        front = _front(part, x)
        ax.plot(front[x], front["mean"], color="grey", lw=0.8, ls="--", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in palette.items()]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=k) for k, m in markers.items()]
    ax.legend(handles=handles, bbox_to_anchor=(1.02, 1), loc="upper left", fontsize="small")
    ax.set_title("dashed: Pareto front (no cheaper point is as accurate)")
    return fig


def _front(table: pd.DataFrame, x: str) -> pd.DataFrame:
    best, keep = -np.inf, []
    ordered = table.sort_values(x)
    for i, r in ordered.iterrows():
        if r["mean"] > best:
            best = r["mean"]
            keep.append(i)
    return ordered.loc[keep]


def rounds_to_target(rounds: pd.DataFrame, target: float,
                     by: tuple[str, ...] = ("model", "variant")) -> pd.DataFrame:
    """Rounds to ``target`` per group, mean over seeds: :func:`measures.rounds_to_target_table`
    (never reached counts as the last round + 1, as in the F4 verdict)."""
    return measures.rounds_to_target_table(rounds, target, by)


def grouped_bars(runs: pd.DataFrame, x: str, hue: str, col: str | None = None,
                 row: str | None = None, value: str = "final_test_acc",
                 ylabel: str = "final test accuracy",
                 reference: dict[str, float] | None = None) -> sns.FacetGrid:
    """Bars of ``value`` (mean, error bar = spread over seeds) by ``x`` and ``hue``.

    Every setting that is not ``x``, ``hue``, ``col`` or ``row`` must be fixed, or the bars
    mix settings. ``reference`` draws a dashed line per ``col`` value (e.g. zero-shot).
    """
    theme()
    grid = sns.catplot(data=runs, x=x, y=value, hue=hue, col=col, row=row, kind="bar",
                       errorbar="sd", capsize=0.1, height=3.4, aspect=1.3)
    grid.set_axis_labels(x, ylabel)
    _short_titles(grid)
    panels = grid.axes_dict.items() if (col or row) else [(None, grid.ax)]
    for key, ax in panels:
        name = key[-1] if isinstance(key, tuple) else key
        ax.tick_params(axis="x", rotation=30)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        if reference and name in reference:
            line = ax.axhline(reference[name], color="k", ls="--", lw=1, label="zero-shot")
            ax.legend(handles=[line], loc="upper left", fontsize="small")
    return grid


def shots_curve(runs: pd.DataFrame, hue: str = "model", style: str = "variant") -> plt.Figure:
    """Final accuracy against shots per class per client (log2 axis)."""
    theme()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=runs, x="shots", y="final_test_acc", hue=hue, style=style, marker="o",
                 errorbar="sd", ax=ax)
    ax.set_xscale("log", base=2)
    shots = sorted(runs["shots"].unique())
    ax.set_xticks(shots, [str(int(s)) for s in shots])
    ax.set_xlabel("training images per class per client (K)")
    ax.set_ylabel("final test accuracy")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize="small")
    return fig
