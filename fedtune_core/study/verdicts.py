"""The paper's claims, tested on run records with paired per-seed intervals.

Every comparison is paired by seed (same seed = same partition, client sampling and data
order on both sides): the per-seed differences, their mean and a 95% t interval
(:mod:`fedtune_core.study.stats`). A side is *supported* when the interval lies above zero, *not
supported* when below, *inconclusive* when it contains zero; beside each verdict stands
the smallest difference its seeds could resolve (the interval's half-width).

A claim made of parts ("A, because B") needs every part: one part against it makes it
*not supported*. A claim tested in several settings (models, datasets) is *supported* or
*not supported* only when every setting agrees; mixed settings are *inconclusive*, and the
evidence names each.

"Strong" weights: where runs of one model use several checkpoints (random, weak, strong
pre-training), the strong one is the checkpoint with the best *validation* score of its
pre-trained representation: the linear probe's 5-fold cross-validated accuracy on the
digits training pool, recorded in each run's ``weights`` entry (:mod:`fedtune_core.proxy.probe`).
No test metric enters that choice (:func:`strong_choice` shows it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from fedtune_core.study import measures
from fedtune_core.study.measures import TARGET_FRACTION
from fedtune_core.study.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Paired, paired
from fedtune_core.study.strong import strong_choice as strong_choice  # re-exported
from fedtune_core.study.strong import strong_only as strong_only

NOT_MEASURABLE = "not measurable"
LIGHT_EXCLUDES = ("full",)  # F4: every other method counts as lightweight
ACC = measures.FINAL

RULES = f"""\
- Every comparison is **paired by seed** (same seed: same partition, client sampling and data \
order): the per-seed differences, their mean and a **95% Student-t interval** over the seeds. \
**Supported** when the interval lies above zero, **not supported** when below, \
**inconclusive** when it contains zero (or with one seed). Beside each effect: the seeds and \
the smallest difference they could resolve (the interval's half-width). Why t and not a \
bootstrap: docs/protocol.md.
- Claims are judged on each model's **strong** checkpoint: the one whose linear probe has the \
best **cross-validated accuracy on the training pool** (a validation score; no test metric \
chooses anything).
- A claim tested in several settings is supported (or not) only when all settings agree; \
mixed settings are inconclusive. A claim with parts ("A, because B") needs every part.
- **F1**: per model, bias tuning against *every* other method (final test accuracy); the \
effect shown is against the closest one.
- **F2a**: CLIP against ViT, final test accuracy averaged over the methods both ran.
- **F2b**: CLIP against ViT at the fewest shots, *and* the accuracy lost from the most to the \
fewest shots (CLIP must lose less).
- **F3**: FedAvg against local-only training on the global test set, *and* the train − local \
test gap (local must over-fit more).
- **F4**: lightweight methods (all but full) against full fine-tuning: rounds to reach \
{TARGET_FRACTION:.0%} of the best method's final accuracy (never reached counts as rounds + 1), \
*and* bytes communicated."""


class Verdict(NamedTuple):
    """A claim's verdict, the evidence in words, and each setting's effect and interval."""

    verdict: str
    evidence: str
    effect: str = ""  # "setting: mean [low, high], seeds, resolves ±h; ..."


def compare(a: pd.Series, b: pd.Series) -> str:
    """Verdict on "a is above b", from per-seed values of each side (paired by seed)."""
    return paired(a, b).verdict


def fmt(values: pd.Series, digits: int = 3) -> str:
    """``mean ± std`` of per-seed values."""
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return f"{float(values.mean()):.{digits}f} ± {0.0 if np.isnan(std) else std:.{digits}f}"


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


def _label(runs: pd.DataFrame) -> str:
    """The column that names checkpoints for a reader (``checkpoint`` from report.frames)."""
    return "checkpoint" if "checkpoint" in runs else "weights"


def _per_seed(runs: pd.DataFrame, value: str = ACC) -> pd.Series:
    return runs.groupby("seed")[value].mean()


def _rank(part: pd.DataFrame, variant: str) -> str:
    means = part.groupby("variant")[ACC].mean().sort_values(ascending=False)
    return f"{list(means.index).index(variant) + 1}/{len(means)}" if variant in means else "-"


def _effect(name: str, p: Paired, digits: int = 3) -> str:
    return f"{name}: {p.text(digits)}"


def bias_is_best(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F1: on a strong pre-trained model, bias tuning beats every other method."""
    if runs.empty or "bias" not in set(runs["variant"]):
        return Verdict(NOT_MEASURABLE, "no bias-tuning runs")
    strong = strong_only(runs)
    verdicts, notes, effects = [], [], []
    for (dataset, model), part in strong.groupby(["dataset", "model"], sort=False):
        bias = _per_seed(part[part["variant"] == "bias"])
        rivals = {v: paired(bias, _per_seed(p)) for v, p in part.groupby("variant", sort=False)
                  if v != "bias"}
        if not rivals:
            continue
        verdict = all_parts([p.verdict for p in rivals.values()])
        closest = min(rivals, key=lambda v: rivals[v].mean)
        verdicts.append(verdict)
        ranks = ", ".join(f"{w}: {_rank(p, 'bias')}" for w, p in
                          runs[(runs["model"] == model) & (runs["dataset"] == dataset)]
                          .groupby(_label(runs), sort=False, observed=True))
        beaten = sum(p.verdict == SUPPORTED for p in rivals.values())
        notes.append(f"{model} ({part[_label(part)].iloc[0]}, {dataset}): bias {fmt(bias)}; "
                     f"ahead of {beaten} of {len(rivals)} other methods, closest {closest}: "
                     f"{verdict}; bias ranks {ranks}")
        effects.append(_effect(f"{model}, bias − {closest}", rivals[closest]))
    if not verdicts:
        return Verdict(NOT_MEASURABLE, "no method to compare bias tuning with")
    return Verdict(across_settings(verdicts), "; ".join(notes), "; ".join(effects))


def _family_pairs(runs: pd.DataFrame):
    clip = sorted(set(runs.loc[runs["family"] == "CLIP", "model"]))
    vit = sorted(set(runs.loc[runs["family"] == "ViT", "model"]))
    return [(c, v) for c in clip for v in vit]


def _paired(runs: pd.DataFrame, clip: str, vit: str, keys: list[str]) -> pd.DataFrame:
    """Rows of both models, restricted to the settings (``keys`` + seed) both ran."""
    a = runs[runs["model"] == clip].set_index([*keys, "seed"])[ACC]
    b = runs[runs["model"] == vit].set_index([*keys, "seed"])[ACC]
    both = pd.concat({"CLIP": a, "ViT": b}, axis=1, join="inner")
    return both.reset_index()


def clip_beats_vit(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F2a: CLIP's final accuracy is above ViT's (mean over the methods both ran)."""
    pairs = _family_pairs(runs) if not runs.empty else []
    if not pairs:
        return Verdict(NOT_MEASURABLE, "needs runs of both a CLIP and a ViT model")
    strong = strong_only(runs)
    verdicts, notes, effects = [], [], []
    for clip, vit in pairs:
        both = _paired(strong, clip, vit, ["dataset", "variant"])
        if both.empty:
            continue
        c, v = both.groupby("seed")["CLIP"].mean(), both.groupby("seed")["ViT"].mean()
        diff = paired(c, v)
        verdicts.append(diff.verdict)
        means = both.groupby(["dataset", "variant"])[["CLIP", "ViT"]].mean()
        wins = int((means["CLIP"] > means["ViT"]).sum())
        notes.append(f"{clip} {fmt(c)} vs {vit} {fmt(v)} (mean over {len(means)} methods; "
                     f"CLIP ahead in {wins} of {len(means)}): {diff.verdict}")
        effects.append(_effect(f"{clip} − {vit}", diff))
    if not verdicts:
        return Verdict(NOT_MEASURABLE, "no setting run by both CLIP and ViT")
    return Verdict(across_settings(verdicts), "; ".join(notes), "; ".join(effects))


def clip_more_robust_few_shot(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F2b: at the fewest shots CLIP is ahead, and it loses less from the most shots."""
    shots = runs.dropna(subset=["shots"]) if not runs.empty else runs
    pairs = _family_pairs(shots) if not shots.empty else []
    if not pairs or shots["shots"].nunique() < 2:
        return Verdict(NOT_MEASURABLE,
                       "needs few-shot runs of a CLIP and a ViT model at two K or more")
    strong = strong_only(shots)
    low, high = strong["shots"].min(), strong["shots"].max()
    verdicts, notes, effects = [], [], []
    for clip, vit in pairs:
        both = _paired(strong, clip, vit, ["dataset", "variant", "shots"])
        at = {k: both[both["shots"] == k].groupby("seed")[["CLIP", "ViT"]].mean()
              for k in (low, high)}
        drop = at[high] - at[low]
        ahead = paired(at[low]["CLIP"], at[low]["ViT"])
        robust = paired(drop["ViT"], drop["CLIP"])
        verdicts.append(all_parts([ahead.verdict, robust.verdict]))
        notes.append(f"{clip} vs {vit}: at K={low:g} {fmt(at[low]['CLIP'])} vs "
                     f"{fmt(at[low]['ViT'])} ({ahead.verdict}); lost from K={high:g} to "
                     f"K={low:g} {fmt(drop['CLIP'])} vs {fmt(drop['ViT'])} (CLIP loses less: "
                     f"{robust.verdict})")
        effects += [_effect(f"K={low:g}, CLIP − ViT", ahead),
                    _effect("loss, ViT − CLIP", robust)]
    return Verdict(across_settings(verdicts), "; ".join(notes), "; ".join(effects))


def fl_beats_local(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F3: FedAvg beats local-only training on the global test set; local over-fits."""
    if runs.empty or not {"fl", "local"} <= set(runs["mode"]):
        return Verdict(NOT_MEASURABLE, "needs both FedAvg and local-only runs")
    runs = measures.with_gap(runs)
    verdicts, notes, effects = [], [], []
    for model, part in runs.groupby("model", sort=False):
        keys = ["dataset", "variant", "partition", "weights"]
        fl = part[part["mode"] == "fl"].set_index([*keys, "seed"])
        local = part[part["mode"] == "local"].set_index([*keys, "seed"])
        common = fl.index.intersection(local.index)
        if common.empty:
            continue
        fl, local = fl.loc[common].reset_index(), local.loc[common].reset_index()
        beats = paired(_per_seed(fl), _per_seed(local))
        overfits = paired(_per_seed(local, "gap"), _per_seed(fl, "gap"))
        verdicts.append(all_parts([beats.verdict, overfits.verdict]))
        settings = len(common.droplevel("seed").unique())
        notes.append(f"{model} over {settings} settings: FedAvg {fmt(_per_seed(fl))} vs local "
                     f"{fmt(_per_seed(local))} ({beats.verdict}); train − local test gap "
                     f"local {fmt(_per_seed(local, 'gap'))} vs FedAvg "
                     f"{fmt(_per_seed(fl, 'gap'))} (local over-fits more: {overfits.verdict})")
        effects += [_effect(f"{model}, FedAvg − local", beats),
                    _effect(f"{model}, gap local − FedAvg", overfits)]
    if not verdicts:
        return Verdict(NOT_MEASURABLE, "no setting run in both modes")
    return Verdict(across_settings(verdicts), "; ".join(notes), "; ".join(effects))


rounds_to_target = measures.rounds_to_target  # the one definition (see fedtune_core.study.measures)


def lightweight_is_cheap(runs: pd.DataFrame, rounds: pd.DataFrame | None = None) -> Verdict:
    """F4: lightweight tuning converges in fewer rounds and communicates less than full."""
    if runs.empty or rounds is None or rounds.empty or "full" not in set(runs["variant"]):
        return Verdict(NOT_MEASURABLE,
                       "needs full fine-tuning and lightweight runs with per-round metrics")
    strong = strong_only(runs)
    verdicts, notes, effects = [], [], []
    for (dataset, model, weights), part in strong.groupby(["dataset", "model", "weights"],
                                                         sort=False):
        curve = rounds[(rounds["dataset"] == dataset) & (rounds["model"] == model)
                       & (rounds["weights"] == weights)]
        light = [v for v in part["variant"].unique() if v not in LIGHT_EXCLUDES]
        if not light or curve.empty:
            continue
        target = measures.target_accuracy(part)
        reach = measures.rounds_to_target(curve, target)
        full_r = reach.loc["full"]
        light_r = reach.loc[light].groupby("seed").mean()
        fast = paired(full_r, light_r)  # full needs more rounds: lightweight is faster
        bytes_ = part.groupby("variant")["communication"].mean()
        cheap = SUPPORTED if bytes_[light].max() < bytes_["full"] else NOT_SUPPORTED
        verdicts.append(all_parts([fast.verdict, cheap]))
        each = ", ".join(f"{v} {reach.loc[v].mean():.1f}" for v in light)
        notes.append(f"{model} ({part[_label(part)].iloc[0]}, {dataset}), target "
                     f"{target:.3f}: rounds full "
                     f"{fmt(full_r, 1)} vs lightweight {fmt(light_r, 1)} ({each}): "
                     f"{fast.verdict}; bytes full {bytes_['full'] / 1e6:.2f} MB vs lightweight "
                     f"at most {bytes_[light].max() / 1e6:.2f} MB ({cheap})")
        effects.append(_effect(f"{model}, rounds full − lightweight", fast, 1))
    if not verdicts:
        return Verdict(NOT_MEASURABLE, "no model with both full and lightweight runs")
    return Verdict(across_settings(verdicts), "; ".join(notes), "; ".join(effects))


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
