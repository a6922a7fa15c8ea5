"""The verdict logic on hand-made records: every claim, every outcome.

Records are built by hand (config, final metrics, per-round curve) and go through the same
``report.frames`` the notebooks use, so the tests cover the path from record to verdict.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from fedtune_core import report, verdicts
from fedtune_core.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

SEEDS = (0, 1, 2)
JITTER = (-0.01, 0.0, 0.01)  # per seed: spread 0.01
_ids = itertools.count()


def record(model: str, variant: str, seed: int, acc: float, *, weights: str = "strong",
           partition: str = "dirichlet:0.5", mode: str = "fl", train: float = 0.9,
           local: float = 0.8, bytes_: int = 1000, curve: list[float] | None = None) -> dict:
    """A finished record with the fields the frames and verdicts read."""
    cfg = {"model": model, "weights": weights, "method": variant, "method_options": {},
           "dataset": "digits", "partition": partition, "mode": mode, "seed": seed,
           "clients": 10, "rounds": len(curve or [acc]), "lr": 0.001}
    curve = curve or [acc]
    rounds = [{"round": r, "test_acc": a} for r, a in enumerate([0.1, *curve])]
    final = {"test_acc": acc, "train_acc": train, "local_test_acc": local,
             "bytes_up": bytes_, "bytes_down": bytes_}
    return {"status": "ok", "hash": f"{next(_ids):016x}", "seed": seed, "config": cfg,
            "final": final, "rounds": rounds, "params": {"trainable": 1, "total": 2}}


def seeded(model: str, variant: str, acc: float, spread: float = 1.0, **kw) -> list[dict]:
    """One record per seed around ``acc`` (spread 0.01 x ``spread``)."""
    pairs = zip(SEEDS, JITTER, strict=True)
    return [record(model, variant, s, acc + spread * j, **kw) for s, j in pairs]


def judge(test, records: list[dict]) -> tuple[str, str]:
    runs, rounds = report.frames(records)
    return test(runs, rounds)


@pytest.mark.parametrize("a, b, expected", [
    ([0.9, 0.91, 0.92], [0.8, 0.81, 0.82], SUPPORTED),
    ([0.8, 0.81, 0.82], [0.9, 0.91, 0.92], NOT_SUPPORTED),
    ([0.80, 0.85, 0.90], [0.82, 0.83, 0.84], INCONCLUSIVE),  # intervals overlap
    ([0.9], [0.1], INCONCLUSIVE),  # one seed has no spread to judge by
])
def test_compare_uses_the_spread_over_seeds(a, b, expected):
    assert verdicts.compare(pd.Series(a), pd.Series(b)) == expected


def test_settings_and_parts_combine_as_documented():
    assert verdicts.across_settings([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert verdicts.across_settings([SUPPORTED, NOT_SUPPORTED]) == INCONCLUSIVE
    assert verdicts.across_settings([NOT_SUPPORTED, NOT_SUPPORTED]) == NOT_SUPPORTED
    assert verdicts.all_parts([SUPPORTED, NOT_SUPPORTED]) == NOT_SUPPORTED
    assert verdicts.all_parts([SUPPORTED, INCONCLUSIVE]) == INCONCLUSIVE
    assert verdicts.all_parts([SUPPORTED, SUPPORTED]) == SUPPORTED


def _methods(model: str, accs: dict[str, float], **kw) -> list[dict]:
    return [r for v, a in accs.items() for r in seeded(model, v, a, **kw)]


@pytest.mark.parametrize("bias, expected", [(0.95, SUPPORTED), (0.80, NOT_SUPPORTED),
                                            (0.905, INCONCLUSIVE)])
def test_f1_bias_against_the_best_other_method(bias, expected):
    recs = _methods("clip-tiny", {"bias": bias, "full": 0.90, "head": 0.70})
    verdict, evidence = judge(verdicts.bias_is_best, recs)
    assert verdict == expected
    assert "best other, full" in evidence


def test_f1_is_judged_on_the_strong_checkpoint_only():
    strong = _methods("vit-tiny", {"bias": 0.80, "full": 0.90, "head": 0.75})
    weak = _methods("vit-tiny", {"bias": 0.60, "full": 0.40, "head": 0.50}, weights="weak")
    verdict, evidence = judge(verdicts.bias_is_best, strong + weak)
    assert verdict == NOT_SUPPORTED  # bias wins on the weak checkpoint, which is not judged
    assert "vit-tiny (strong" in evidence and "weak: 1/3" in evidence


def test_f1_mixed_models_are_inconclusive():
    clip = _methods("clip-tiny", {"bias": 0.95, "full": 0.90})
    vit = _methods("vit-tiny", {"bias": 0.80, "full": 0.90})
    assert judge(verdicts.bias_is_best, clip + vit)[0] == INCONCLUSIVE


@pytest.mark.parametrize("clip, expected", [(0.9, SUPPORTED), (0.7, NOT_SUPPORTED),
                                            (0.805, INCONCLUSIVE)])
def test_f2a_clip_against_vit(clip, expected):
    recs = (_methods("clip-tiny", {"bias": clip, "full": clip})
            + _methods("vit-tiny", {"bias": 0.8, "full": 0.8}))
    verdict, evidence = judge(verdicts.clip_beats_vit, recs)
    assert verdict == expected and "mean over 2 methods" in evidence


def _shots(model: str, low: float, high: float) -> list[dict]:
    return [r for k, a in ((1, low), (16, high))
            for r in seeded(model, "bias", a, partition=f"fewshot:{k}")]


@pytest.mark.parametrize("clip, vit, expected", [
    ((0.70, 0.90), (0.40, 0.90), SUPPORTED),  # ahead at K=1, loses 0.20 vs ViT's 0.50
    ((0.45, 0.99), (0.40, 0.90), NOT_SUPPORTED),  # ahead at K=1, but loses 0.54 vs 0.50
    ((0.30, 0.85), (0.40, 0.90), NOT_SUPPORTED),  # behind at K=1
    ((0.405, 0.905), (0.40, 0.90), INCONCLUSIVE),  # level with ViT everywhere
])
def test_f2b_few_shot_needs_both_parts(clip, vit, expected):
    recs = _shots("clip-tiny", *clip) + _shots("vit-tiny", *vit)
    verdict, evidence = judge(verdicts.clip_more_robust_few_shot, recs)
    assert verdict == expected, evidence
    assert "at K=1" in evidence and "from K=16 to K=1" in evidence


def _modes(fl: float, local: float, gap_local: float) -> list[dict]:
    out = []
    for part in ("iid", "dirichlet:0.1"):
        out += seeded("vit-tiny", "bias", fl, partition=part, mode="fl", train=0.9, local=0.85)
        out += seeded("vit-tiny", "bias", local, partition=part, mode="local", train=0.95,
                      local=0.95 - gap_local)
    return out


@pytest.mark.parametrize("fl, local, gap, expected", [
    (0.9, 0.6, 0.4, SUPPORTED),
    (0.9, 0.6, 0.0, NOT_SUPPORTED),  # FedAvg wins, but local does not over-fit more
    (0.6, 0.9, 0.4, NOT_SUPPORTED),
    (0.9, 0.9, 0.4, INCONCLUSIVE),
])
def test_f3_fl_against_local(fl, local, gap, expected):
    verdict, evidence = judge(verdicts.fl_beats_local, _modes(fl, local, gap))
    assert verdict == expected, evidence
    assert "over 2 settings" in evidence


def _curves(light_curve: list[float], light_bytes: int = 100) -> list[dict]:
    full_curve = [0.3, 0.6, 0.8, 0.9]
    out = []
    for s in SEEDS:
        out.append(record("vit-tiny", "full", s, 0.9, curve=full_curve, bytes_=10_000))
        for variant, shift in (("bias", 0.0), ("head", -0.01)):
            curve = [a + shift + 0.002 * s for a in light_curve]
            out.append(record("vit-tiny", variant, s, curve[-1], curve=curve, bytes_=light_bytes))
    return out


@pytest.mark.parametrize("light, light_bytes, expected", [
    ([0.8, 0.85, 0.86, 0.87], 100, SUPPORTED),  # target 0.72: round 1 vs full's round 3
    ([0.8, 0.85, 0.86, 0.87], 20_000, NOT_SUPPORTED),  # fast, but sends more than full
    ([0.2, 0.3, 0.5, 0.8], 100, NOT_SUPPORTED),  # round 4 vs 3
    ([0.3, 0.6, 0.8, 0.9], 100, INCONCLUSIVE),  # the same curve as full
])
def test_f4_lightweight_rounds_and_bytes_against_full(light, light_bytes, expected):
    verdict, evidence = judge(verdicts.lightweight_is_cheap, _curves(light, light_bytes))
    assert verdict == expected, evidence
    assert "target 0.72" in evidence


def test_f4_never_reaching_the_target_counts_as_one_round_more():
    rounds = pd.DataFrame({"variant": ["a"] * 3, "seed": [0] * 3, "round": [0, 1, 2],
                           "test_acc": [0.1, 0.2, 0.3]})
    assert verdicts.rounds_to_target(rounds, 0.9).loc[("a", 0)] == 3


def test_findings_of_a_pretrained_profile_are_measured():
    recs = (_methods("clip-tiny", {"bias": 0.95, "full": 0.90, "head": 0.8})
            + _methods("vit-tiny", {"bias": 0.85, "full": 0.90, "head": 0.8}))
    profile = report.Profile("hand", "", True, SEEDS, {}, {}, {}, {})
    table = report.findings(profile, {"tuning_methods": recs, "clip_vs_vit": recs})
    assert list(table["finding"]) == ["F1", "F2a", "F2b", "F3", "F4"]
    by_key = dict(zip(table["finding"], table["verdict"], strict=True))
    assert by_key["F1"] == INCONCLUSIVE and by_key["F2a"] == SUPPORTED
    assert by_key["F2b"] == by_key["F3"] == report.NOT_MEASURABLE_HERE  # no such runs
    assert by_key["F4"] == NOT_SUPPORTED  # every method sent as many bytes as full


def test_proxy_quality_lists_each_checkpoint_once_from_the_records():
    weights = {"kind": "recipe", "recipe": "glyphs-strong", "hash": "abc", "steps": 1500,
               "image_passes": 192_000, "pretrain_acc": 0.7, "probe_acc": 0.94,
               "zeroshot_acc": 0.6}
    recs = seeded("clip-tiny", "bias", 0.9) + seeded("vit-tiny", "bias", 0.8)
    for rec in recs:
        rec["weights"], rec["versions"] = dict(weights), {"torch": "2.14.1"}
    recs[-1]["weights"] = {"kind": "none", "source": None}  # random init: no row
    table = report.proxy_quality(recs)
    assert list(table["model"]) == ["clip-tiny", "vit-tiny"]
    assert table.iloc[0]["digits linear probe"] == 0.94
    assert "pre-trained offline: glyphs-strong abc, 1,500 steps" in report.header(
        report.Profile("hand", "", True, SEEDS, {}, {}, {}, {}), recs)
