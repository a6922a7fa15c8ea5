"""The paper's claims, tested on run records with the spread over seeds.

Every comparison is made per seed and then summarised as mean ± standard deviation over
the seeds (same seed = same partition, client sampling and data order, so the two sides
are paired). Two sides whose intervals ``mean ± std`` overlap are *inconclusive*; otherwise
the direction decides between *supported* and *not supported*. Fewer than two seeds on a
side is always inconclusive: one seed has no spread to judge by.

A claim made of parts ("A, because B") needs every part: one part against it makes it
*not supported*. A claim tested in several settings (models, datasets) is *supported* or
*not supported* only when every setting agrees; mixed settings are *inconclusive*, and the
evidence names each.

"Strong" weights: where runs of one model use several checkpoints (random, weak, strong
pre-training), the strong one is the checkpoint with the best head-only (linear probe)
accuracy, the usual measure of a pre-trained representation; the claims about pre-trained
models are judged on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

SUPPORTED, NOT_SUPPORTED = "supported", "not supported"
INCONCLUSIVE, NOT_MEASURABLE = "inconclusive", "not measurable"
TARGET_FRACTION = 0.8  # F4: rounds to reach this share of the best method's final accuracy
LIGHT_EXCLUDES = ("full",)  # F4: every other method counts as lightweight

RULES = f"""\
- Every comparison is made per seed and summarised as mean ± standard deviation over seeds; \
when the two sides' intervals overlap the verdict is **inconclusive**, otherwise the direction \
decides (**supported** / **not supported**). One seed is always inconclusive.
- Claims are judged on each model's **strong** checkpoint: the one with the best head-only \
(linear probe) accuracy where several are run.
- A claim tested in several settings is supported (or not) only when all settings agree; \
mixed settings are inconclusive. A claim with parts ("A, because B") needs every part.
- **F1**: per model, bias tuning against the best other method (final test accuracy).
- **F2a**: CLIP against ViT, final test accuracy averaged over the methods both ran.
- **F2b**: CLIP against ViT at the fewest shots, *and* the accuracy lost from the most to the \
fewest shots (CLIP must lose less).
- **F3**: FedAvg against local-only training on the global test set, *and* the train − local \
test gap (local must over-fit more).
- **F4**: lightweight methods (all but full) against full fine-tuning: rounds to reach \
{TARGET_FRACTION:.0%} of the best method's final accuracy (never reached counts as rounds + 1), \
*and* bytes communicated."""

Verdict = tuple[str, str]


def _interval(values: pd.Series) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def compare(a: pd.Series, b: pd.Series) -> str:
    """Verdict on "a is above b", from per-seed values of each side."""
    if min(len(a), len(b)) < 2:
        return INCONCLUSIVE
    (ma, sa), (mb, sb) = _interval(a), _interval(b)
    if ma - sa > mb + sb:
        return SUPPORTED
    if ma + sa < mb - sb:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def fmt(values: pd.Series, digits: int = 3) -> str:
    """``mean ± std`` of per-seed values."""
    mean, std = _interval(values)
    return f"{mean:.{digits}f} ± {0.0 if np.isnan(std) else std:.{digits}f}"


def across_settings(verdicts: Sequence[str]) -> str:
    """Supported or not only when every setting agrees; mixed settings are inconclusive."""
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if verdicts and all(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def all_parts(verdicts: Sequence[str]) -> str:
    """A claim with parts: any part against it decides; every part for it is needed."""
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return SUPPORTED if verdicts and all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


def strong_only(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep each model's strong checkpoint (best head-only, else best mean, accuracy)."""
    if runs.empty or "weights" not in runs:
        return runs
    keep = []
    for _, part in runs.groupby("model", sort=False):
        probe = part[part["variant"] == "head"]
        pool = probe if not probe.empty else part
        best = pool.groupby("weights")["final_test_acc"].mean().idxmax()
        keep.append(part[part["weights"] == best])
    return pd.concat(keep)


def _label(runs: pd.DataFrame) -> str:
    """The column that names checkpoints for a reader (``checkpoint`` from report.frames)."""
    return "checkpoint" if "checkpoint" in runs else "weights"


def _per_seed(runs: pd.DataFrame, value: str = "final_test_acc") -> pd.Series:
    return runs.groupby("seed")[value].mean()


def _rank(part: pd.DataFrame, variant: str) -> str:
    means = part.groupby("variant")["final_test_acc"].mean().sort_values(ascending=False)
    return f"{list(means.index).index(variant) + 1}/{len(means)}" if variant in means else "-"


def bias_is_best(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F1: on a strong pre-trained model, bias tuning is the best method."""
    if runs.empty or "bias" not in set(runs["variant"]):
        return NOT_MEASURABLE, "no bias-tuning runs"
    strong = strong_only(runs)
    verdicts, notes = [], []
    for (dataset, model), part in strong.groupby(["dataset", "model"], sort=False):
        others = part[part["variant"] != "bias"]
        if others.empty:
            continue
        best = others.groupby("variant")["final_test_acc"].mean().idxmax()
        bias = _per_seed(part[part["variant"] == "bias"])
        rival = _per_seed(part[part["variant"] == best])
        verdict = compare(bias, rival)
        verdicts.append(verdict)
        ranks = ", ".join(f"{w}: {_rank(p, 'bias')}" for w, p in
                          runs[(runs["model"] == model) & (runs["dataset"] == dataset)]
                          .groupby(_label(runs), sort=False, observed=True))
        notes.append(f"{model} ({part[_label(part)].iloc[0]}, {dataset}): bias {fmt(bias)} vs "
                     f"best other, {best}, {fmt(rival)}: {verdict}; bias ranks {ranks}")
    if not verdicts:
        return NOT_MEASURABLE, "no method to compare bias tuning with"
    return across_settings(verdicts), "; ".join(notes)


def _family_pairs(runs: pd.DataFrame):
    clip = sorted(set(runs.loc[runs["family"] == "CLIP", "model"]))
    vit = sorted(set(runs.loc[runs["family"] == "ViT", "model"]))
    return [(c, v) for c in clip for v in vit]


def _paired(runs: pd.DataFrame, clip: str, vit: str, keys: list[str]) -> pd.DataFrame:
    """Rows of both models, restricted to the settings (``keys`` + seed) both ran."""
    a = runs[runs["model"] == clip].set_index([*keys, "seed"])["final_test_acc"]
    b = runs[runs["model"] == vit].set_index([*keys, "seed"])["final_test_acc"]
    both = pd.concat({"CLIP": a, "ViT": b}, axis=1, join="inner")
    return both.reset_index()


def clip_beats_vit(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F2a: CLIP's final accuracy is above ViT's (mean over the methods both ran)."""
    pairs = _family_pairs(runs) if not runs.empty else []
    if not pairs:
        return NOT_MEASURABLE, "needs runs of both a CLIP and a ViT model"
    strong = strong_only(runs)
    verdicts, notes = [], []
    for clip, vit in pairs:
        both = _paired(strong, clip, vit, ["dataset", "variant"])
        if both.empty:
            continue
        c, v = both.groupby("seed")["CLIP"].mean(), both.groupby("seed")["ViT"].mean()
        verdict = compare(c, v)
        verdicts.append(verdict)
        means = both.groupby(["dataset", "variant"])[["CLIP", "ViT"]].mean()
        wins = int((means["CLIP"] > means["ViT"]).sum())
        notes.append(f"{clip} {fmt(c)} vs {vit} {fmt(v)} (mean over {len(means)} methods; "
                     f"CLIP ahead in {wins} of {len(means)}): {verdict}")
    if not verdicts:
        return NOT_MEASURABLE, "no setting run by both CLIP and ViT"
    return across_settings(verdicts), "; ".join(notes)


def clip_more_robust_few_shot(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F2b: at the fewest shots CLIP is ahead, and it loses less from the most shots."""
    shots = runs.dropna(subset=["shots"]) if not runs.empty else runs
    pairs = _family_pairs(shots) if not shots.empty else []
    if not pairs or shots["shots"].nunique() < 2:
        return NOT_MEASURABLE, "needs few-shot runs of a CLIP and a ViT model at two K or more"
    strong = strong_only(shots)
    low, high = strong["shots"].min(), strong["shots"].max()
    verdicts, notes = [], []
    for clip, vit in pairs:
        both = _paired(strong, clip, vit, ["dataset", "variant", "shots"])
        at = {k: both[both["shots"] == k].groupby("seed")[["CLIP", "ViT"]].mean()
              for k in (low, high)}
        drop = at[high] - at[low]
        ahead = compare(at[low]["CLIP"], at[low]["ViT"])
        robust = compare(drop["ViT"], drop["CLIP"])
        verdicts.append(all_parts([ahead, robust]))
        notes.append(f"{clip} vs {vit}: at K={low:g} {fmt(at[low]['CLIP'])} vs "
                     f"{fmt(at[low]['ViT'])} ({ahead}); lost from K={high:g} to K={low:g} "
                     f"{fmt(drop['CLIP'])} vs {fmt(drop['ViT'])} (CLIP loses less: {robust})")
    return across_settings(verdicts), "; ".join(notes)


def fl_beats_local(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F3: FedAvg beats local-only training on the global test set; local over-fits."""
    if runs.empty or not {"fl", "local"} <= set(runs["mode"]):
        return NOT_MEASURABLE, "needs both FedAvg and local-only runs"
    runs = runs.assign(gap=runs["final_train_acc"] - runs["final_local_test_acc"])
    verdicts, notes = [], []
    for model, part in runs.groupby("model", sort=False):
        keys = ["dataset", "variant", "partition", "weights"]
        fl = part[part["mode"] == "fl"].set_index([*keys, "seed"])
        local = part[part["mode"] == "local"].set_index([*keys, "seed"])
        common = fl.index.intersection(local.index)
        if common.empty:
            continue
        fl, local = fl.loc[common], local.loc[common]
        acc_fl, acc_local = _per_seed(fl.reset_index()), _per_seed(local.reset_index())
        gap_fl, gap_local = (_per_seed(x.reset_index(), "gap") for x in (fl, local))
        beats, overfits = compare(acc_fl, acc_local), compare(gap_local, gap_fl)
        verdicts.append(all_parts([beats, overfits]))
        settings = len(common.droplevel("seed").unique())
        notes.append(f"{model} over {settings} settings: FedAvg {fmt(acc_fl)} vs local "
                     f"{fmt(acc_local)} ({beats}); train − local test gap local "
                     f"{fmt(gap_local)} vs FedAvg {fmt(gap_fl)} (local over-fits more: "
                     f"{overfits})")
    if not verdicts:
        return NOT_MEASURABLE, "no setting run in both modes"
    return across_settings(verdicts), "; ".join(notes)


def rounds_to_target(rounds: pd.DataFrame, target: float) -> pd.Series:
    """Per (variant, seed): the first round with test accuracy ≥ target; never: rounds + 1."""
    evaluated = rounds.dropna(subset=["test_acc"])
    last = int(evaluated["round"].max())
    hit = evaluated[evaluated["test_acc"] >= target].groupby(["variant", "seed"])["round"].min()
    every = evaluated[["variant", "seed"]].drop_duplicates().set_index(["variant", "seed"]).index
    return hit.reindex(every).fillna(last + 1)


def lightweight_is_cheap(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F4: lightweight tuning converges in fewer rounds and communicates less than full."""
    if runs.empty or rounds is None or rounds.empty or "full" not in set(runs["variant"]):
        return NOT_MEASURABLE, "needs full fine-tuning and lightweight runs with per-round metrics"
    strong = strong_only(runs)
    verdicts, notes = [], []
    for (dataset, model, weights), part in strong.groupby(["dataset", "model", "weights"],
                                                         sort=False):
        curve = rounds[(rounds["dataset"] == dataset) & (rounds["model"] == model)
                       & (rounds["weights"] == weights)]
        light = [v for v in part["variant"].unique() if v not in LIGHT_EXCLUDES]
        if not light or curve.empty:
            continue
        target = TARGET_FRACTION * part.groupby("variant")["final_test_acc"].mean().max()
        reach = rounds_to_target(curve, target)
        full_r = reach.loc["full"]
        light_r = reach.loc[light].groupby("seed").mean()
        fast = compare(full_r, light_r)  # full needs more rounds: lightweight is faster
        bytes_ = part.groupby("variant")["communication"].mean()
        cheap = SUPPORTED if bytes_[light].max() < bytes_["full"] else NOT_SUPPORTED
        verdicts.append(all_parts([fast, cheap]))
        each = ", ".join(f"{v} {reach.loc[v].mean():.1f}" for v in light)
        notes.append(f"{model} ({part[_label(part)].iloc[0]}, {dataset}), target "
                     f"{target:.3f}: rounds full "
                     f"{fmt(full_r, 1)} vs lightweight {fmt(light_r, 1)} ({each}): {fast}; "
                     f"bytes full {bytes_['full'] / 1e6:.2f} MB vs lightweight at most "
                     f"{bytes_[light].max() / 1e6:.2f} MB ({cheap})")
    if not verdicts:
        return NOT_MEASURABLE, "no model with both full and lightweight runs"
    return across_settings(verdicts), "; ".join(notes)


Test = Callable[[pd.DataFrame, pd.DataFrame | None], Verdict]
# (key, claim, experiment whose records it reads, test, report)
FINDINGS: tuple[tuple[str, str, str, Test, str], ...] = (
    ("F1", "Tuning only the bias terms performs best when the pre-trained model is strong.",
     "tuning_methods", bias_is_best, "01_tuning_methods"),
    ("F2a", "CLIP outperforms ViT.", "clip_vs_vit", clip_beats_vit, "02_clip_vs_vit"),
    ("F2b", "CLIP is more robust than ViT in few-shot settings.", "few_shot",
     clip_more_robust_few_shot, "03_few_shot"),
    ("F3", "FL with pre-trained models beats pure local training, which over-fits.",
     "fl_vs_local", fl_beats_local, "04_fl_vs_local"),
    ("F4", "Lightweight tuning converges fast and costs little communication.",
     "tuning_methods", lightweight_is_cheap, "01_tuning_methods"),
)
