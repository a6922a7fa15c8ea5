"""The verdict logic on hand-made records: every claim, every outcome.

Records are built by hand (config, final metrics, per-round curve) and go through the same
``report.frames`` the notebooks use, so the tests cover the path from record to verdict.
"""

from __future__ import annotations

import copy
import html
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from fedtune_core.study import index_page, measures, plots, report, stats, verdicts
from fedtune_core.study.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

SEEDS = (0, 1, 2)
JITTER = (-0.01, 0.0, 0.01)  # per seed: spread 0.01
# the probe's cross-validated accuracy (a validation score) of each hand-made checkpoint
PROBE_VAL = {"strong": 0.9, "weak": 0.6}
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
    entry = {"kind": "recipe", "recipe": weights, "steps": 100,
             "probe_val_acc": PROBE_VAL.get(weights)}
    return {"status": "ok", "hash": f"{next(_ids):016x}", "seed": seed, "config": cfg,
            "final": final, "rounds": rounds, "params": {"trainable": 1, "total": 2},
            "weights": entry}


def seeded(model: str, variant: str, acc: float, spread: float = 1.0, flip: bool = False,
           **kw) -> list[dict]:
    """One record per seed around ``acc`` (spread 0.01 x ``spread``; ``flip``: the seeds'
    jitter reversed, so a pair of sides differs by seed, not by a constant)."""
    pairs = zip(SEEDS, JITTER[::-1] if flip else JITTER, strict=True)
    return [record(model, variant, s, acc + spread * j, **kw) for s, j in pairs]


def judge(test, records: list[dict]) -> tuple[str, str]:
    runs, rounds = report.frames(records)
    return test(runs, rounds)


@pytest.mark.parametrize("a, b, expected", [
    ([0.9, 0.91, 0.92], [0.8, 0.81, 0.82], SUPPORTED),
    ([0.8, 0.81, 0.82], [0.9, 0.91, 0.92], NOT_SUPPORTED),
    ([0.80, 0.85, 0.90], [0.82, 0.83, 0.84], INCONCLUSIVE),  # differences -0.02, 0.02, 0.06
    ([0.80, 0.85, 0.90], [0.79, 0.84, 0.89], SUPPORTED),  # overlapping spreads, paired +0.01
    ([0.9], [0.1], INCONCLUSIVE),  # one seed has no interval
])
def test_compare_pairs_the_seeds(a, b, expected):
    assert verdicts.compare(pd.Series(a), pd.Series(b)) == expected


def test_paired_interval_is_scipys_paired_t_interval():
    a, b = pd.Series([0.81, 0.90, 0.86, 0.70]), pd.Series([0.80, 0.85, 0.88, 0.66])
    ours = stats.paired(a, b)
    ref = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    assert ours.seeds == 4 and ours.mean == pytest.approx((a - b).mean())
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high))
    assert ours.half_width == pytest.approx((ref.high - ref.low) / 2)
    assert ours.verdict == INCONCLUSIVE and "4 seeds, resolves ±" in ours.text()
    only_common = stats.paired(a, b.drop(index=[0, 1]))  # paired over the seeds both have
    assert only_common.seeds == 2


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
def test_f1_bias_against_every_other_method(bias, expected):
    recs = (seeded("clip-tiny", "bias", bias, flip=True)
            + _methods("clip-tiny", {"full": 0.90, "head": 0.70}))
    verdict, evidence, effect = judge(verdicts.bias_is_best, recs)
    assert verdict == expected
    assert "closest full" in evidence and "bias − full: " in effect and "3 seeds" in effect


def test_f1_is_judged_on_the_strong_checkpoint_only():
    strong = _methods("vit-tiny", {"bias": 0.80, "full": 0.90, "head": 0.75})
    weak = _methods("vit-tiny", {"bias": 0.60, "full": 0.40, "head": 0.50}, weights="weak")
    verdict, evidence, _ = judge(verdicts.bias_is_best, strong + weak)
    assert verdict == NOT_SUPPORTED  # bias wins on the weak checkpoint, which is not judged
    assert "vit-tiny (strong" in evidence and "weak: 1/3" in evidence


def test_no_choice_moves_when_the_test_labels_are_permuted():
    """The strong checkpoint is chosen by the probe's validation score, never a test metric:
    permuting the records' test metrics (what permuted test labels would do to them) moves
    no choice, though the test metrics alone would pick the other checkpoint."""
    strong = _methods("vit-tiny", {"bias": 0.60, "full": 0.55, "head": 0.50})
    weak = _methods("vit-tiny", {"bias": 0.90, "full": 0.85, "head": 0.80}, weights="weak")
    recs = strong + weak
    before = verdicts.strong_choice(report.frames(recs)[0])
    assert list(before["weights"]) == ["strong"]  # the test metrics would say "weak"
    rng = np.random.default_rng(0)
    for _ in range(5):
        accs = rng.permutation([r["final"]["test_acc"] for r in recs])
        shuffled = copy.deepcopy(recs)
        for rec, acc in zip(shuffled, accs, strict=True):
            rec["final"]["test_acc"] = float(acc)
            rec["rounds"][-1]["test_acc"] = float(acc)
        runs = report.frames(shuffled)[0]
        pd.testing.assert_frame_equal(verdicts.strong_choice(runs), before)
        assert set(verdicts.strong_only(runs)["weights"]) == {"strong"}


def test_f1_mixed_models_are_inconclusive():
    clip = _methods("clip-tiny", {"bias": 0.95, "full": 0.90})
    vit = _methods("vit-tiny", {"bias": 0.80, "full": 0.90})
    assert judge(verdicts.bias_is_best, clip + vit).verdict == INCONCLUSIVE


@pytest.mark.parametrize("clip, expected", [(0.9, SUPPORTED), (0.7, NOT_SUPPORTED),
                                            (0.805, INCONCLUSIVE)])
def test_f2a_clip_against_vit(clip, expected):
    recs = (_methods("clip-tiny", {"bias": clip, "full": clip}, flip=True)
            + _methods("vit-tiny", {"bias": 0.8, "full": 0.8}))
    verdict, evidence, effect = judge(verdicts.clip_beats_vit, recs)
    assert verdict == expected and "mean over 2 methods" in evidence
    assert effect.startswith("clip-tiny − vit-tiny: ") and "resolves ±" in effect


def _shots(model: str, low: float, high: float, flip: bool = False) -> list[dict]:
    return [r for k, a in ((1, low), (16, high))
            for r in seeded(model, "bias", a, partition=f"fewshot:{k}", flip=flip and k == 1)]


@pytest.mark.parametrize("clip, vit, flip, expected", [
    ((0.70, 0.90), (0.40, 0.90), False, SUPPORTED),  # ahead at K=1, loses 0.20 vs 0.50
    ((0.45, 0.99), (0.40, 0.90), False, NOT_SUPPORTED),  # ahead at K=1, loses 0.54 vs 0.50
    ((0.30, 0.85), (0.40, 0.90), False, NOT_SUPPORTED),  # behind at K=1
    ((0.405, 0.905), (0.40, 0.90), True, INCONCLUSIVE),  # level with ViT, noise by seed
])
def test_f2b_few_shot_needs_both_parts(clip, vit, flip, expected):
    recs = _shots("clip-tiny", *clip, flip=flip) + _shots("vit-tiny", *vit)
    verdict, evidence, _ = judge(verdicts.clip_more_robust_few_shot, recs)
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
    verdict, evidence, _ = judge(verdicts.fl_beats_local, _modes(fl, local, gap))
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
    verdict, evidence, _ = judge(verdicts.lightweight_is_cheap, _curves(light, light_bytes))
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


def test_the_f4_table_and_the_f4_verdict_agree_on_the_same_records():
    """Notebook 01's rounds-to-target table and F4 share one target and one definition:
    a seed that never reaches the target counts as the last round + 1 in both."""
    recs = _curves([0.2, 0.3, 0.5, 0.8])
    recs[1]["rounds"][-1]["test_acc"] = 0.5  # bias, seed 0: never reaches the target
    runs, rounds = report.frames(recs)
    strong = verdicts.strong_only(runs)
    target = measures.target_accuracy(strong)
    table = plots.rounds_to_target(rounds[rounds["hash"].isin(strong["hash"])], target,
                                   by=("variant",)).set_index("variant")
    _, evidence, _ = verdicts.lightweight_is_cheap(runs, rounds)
    assert f"target {target:.3f}" in evidence
    assert table.loc["bias", "reached"] == 2 and table.loc["bias", "seeds"] == 3
    for variant in ("bias", "head"):
        assert f"{variant} {table.loc[variant, 'mean']:.1f}" in evidence
    assert table.loc["bias", "mean"] == pytest.approx((5 + 4 + 4) / 3)  # never: 4 rounds + 1


def test_the_train_test_gap_has_one_definition():
    runs, _ = report.frames(_modes(0.9, 0.6, 0.3))
    gap = measures.train_test_gap(runs)
    local = runs["mode"] == "local"
    assert gap[local].to_numpy() == pytest.approx(0.3)
    _, evidence, _ = verdicts.fl_beats_local(runs, None)
    assert f"local {verdicts.fmt(measures.with_gap(runs)[local].groupby('seed')['gap'].mean())}" \
        in evidence


def test_index_shows_effect_interval_and_seeds_per_verdict(tmp_path):
    recs = (_methods("clip-tiny", {"bias": 0.95, "full": 0.90, "head": 0.8})
            + _methods("vit-tiny", {"bias": 0.85, "full": 0.90, "head": 0.8}, flip=True))
    profile = report.Profile("hand", "", True, SEEDS, {}, {}, {}, {})
    table = report.findings(profile, {"tuning_methods": recs, "clip_vs_vit": recs})
    page = index_page.write_index(tmp_path, profile, table).read_text()
    f2a = verdicts.clip_beats_vit(*report.frames(recs))
    p = stats.paired(*(report.frames(recs)[0].query(f"model == '{m}'").groupby("seed")
                       ["final_test_acc"].mean() for m in ("clip-tiny", "vit-tiny")))
    assert f2a.effect == f"clip-tiny − vit-tiny: {p.text()}"
    assert f2a.effect in page and "3 seeds, resolves ±" in p.text()
    lines = table.set_index("finding").loc["F1", "effect"].splitlines()
    assert len(lines) == 2  # one line per model, each shown on its own line in the page
    assert "<br>".join(html.escape(x) for x in lines) in page


def test_each_model_has_its_own_strong_checkpoint_and_old_records_read_the_sidecar(tmp_path):
    recs = [r for m in ("clip-tiny", "vit-tiny") for w in ("strong", "weak")
            for r in seeded(m, "bias", 0.8, weights=w)]
    sidecar = tmp_path / "clip-weak.json"  # a record without the score: its checkpoint's
    sidecar.write_text(json.dumps({"hash": "abc", "probe_val_acc": 0.99}))
    for rec in recs:
        if rec["config"]["model"] == "clip-tiny" and rec["config"]["weights"] == "weak":
            rec["weights"] |= {"probe_val_acc": None, "hash": "abc",
                               "path": str(tmp_path / "clip-weak.pt")}
    chosen = verdicts.strong_choice(report.frames(recs)[0]).set_index("model")
    assert chosen.loc["clip-tiny", "weights"] == "weak"  # 0.99 from the sidecar
    assert chosen.loc["vit-tiny", "weights"] == "strong"  # 0.9 against 0.6
