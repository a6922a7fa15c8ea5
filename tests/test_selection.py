"""Learning rates chosen on validation data: groups, the choice, the grid's three phases."""

import json
from pathlib import Path

import pytest

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.runs import store
from fedtune_core.study import grid, report, selection


def _record(lr: float, val_acc: float | None, val_loss: float | None = 1.0, *,
            status: str = "ok", test_acc: float | None = None, val_fraction: float = 0.2):
    """A hand-made sweep record; ``test_acc`` plants a test metric that must be ignored."""
    final = {"val_acc": val_acc, "val_loss": val_loss, "samples_processed": 100}
    if test_acc is not None:
        final |= {"test_acc": test_acc, "local_test_acc": test_acc}
    return {"hash": f"h{lr}", "status": status, "wall_seconds": 1.0, "final": final,
            "config": {"lr": lr, "val_fraction": val_fraction}}


def test_the_choice_follows_validation_where_test_disagrees():
    records = [_record(1e-3, 0.60, test_acc=0.95), _record(3e-3, 0.80, test_acc=0.10),
               _record(1e-2, 0.70, test_acc=0.99)]
    lr, scores = selection.choose(records)
    assert lr == 3e-3
    assert [s["val_acc"] for s in scores] == [0.60, 0.80, 0.70]
    assert all("test_acc" not in s for s in scores)


def test_ties_go_to_the_lower_validation_loss_then_the_smaller_rate():
    assert selection.choose([_record(1e-3, 0.8, 0.5), _record(3e-3, 0.8, 0.4)])[0] == 3e-3
    assert selection.choose([_record(3e-3, 0.8, 0.4), _record(1e-3, 0.8, 0.4)])[0] == 1e-3
    # a non-finite loss (a diverged run) ranks last among equal accuracies
    assert selection.choose([_record(1e-3, 0.8, None), _record(3e-3, 0.8, 9.0)])[0] == 3e-3


def test_failed_runs_cannot_win_and_only_sweep_records_choose():
    lr, _ = selection.choose([_record(1e-3, 0.5), _record(3e-3, 0.9, status="failed")])
    assert lr == 1e-3
    assert selection.choose([_record(1e-3, None, status="failed")])[0] is None
    with pytest.raises(ValueError, match="not a validation run"):
        selection.choose([_record(1e-3, 0.5, val_fraction=0.0)])


def test_groups_ignore_federation_knobs_and_separate_everything_else():
    base = RunConfig(model="vit-tiny", weights="none", method="prompt", lr=1e-3)
    same = [base.replace(lr=3e-3), base.replace(seed=2), base.replace(partition="iid"),
            base.replace(clients=20, sample=3, rounds=4, local_epochs=2, mode="local"),
            base.replace(eval_every=2, val_fraction=0.3, local_test_fraction=0.1)]
    assert {selection.group_key(c) for c in same} == {selection.group_key(base)}
    other = [base.replace(model="clip-tiny"), base.replace(method_options={"depth": "deep"}),
             base.replace(optimizer="adamw"), base.replace(batch_size=16),
             base.replace(weight_decay=0.1), base.replace(dataset="synthetic"),
             base.replace(method="bias")]
    keys = {selection.group_key(c) for c in other}
    assert len(keys) == len(other) and selection.group_key(base) not in keys


PROFILE = """
seeds = [3, 4]
[base]
model = "vit-tiny"
weights = "none"
dataset = "digits"
partition = "iid"
clients = 2
sample = 2
rounds = 2
batch_size = 128
optimizer = "adamw"
[lr]
head = 3e-3
bias = { select = [1e-2, 1e-3] }
[lr_selection]
rounds = 1
val_fraction = 0.25
extend = 0  # this test is about the three phases; extensions: test_extension_*
[variants]
head = { method = "head" }
bias = { method = "bias" }
[[tuning_methods]]
variant = ["head", "bias"]
[[few_shot]]
variant = "bias"
partition = "fewshot:2"
clients = 3
"""


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "sel.toml"
    path.write_text(PROFILE)
    return grid.load_profile(path)


def test_a_profile_plans_sweeps_in_its_base_setting(profile):
    (group,) = profile.groups()
    assert group.candidates == (1e-3, 1e-2)  # sorted
    assert [c.lr for c in group.sweeps] == [1e-3, 1e-2]
    for cfg in group.sweeps:
        assert (cfg.method, cfg.seed, cfg.rounds, cfg.eval_every, cfg.val_fraction) == (
            "bias", 3, 1, 1, 0.25)
        assert (cfg.partition, cfg.clients, cfg.sample, cfg.mode) == ("iid", 2, 2, "fl")
    assert len(profile.runs()) == 2  # the head runs: their rate is fixed
    assert len(profile.pending()) == 4  # bias: 2 seeds x (tuning_methods, few_shot)
    assert {c.partition for c in profile.pending("few_shot")} == {"fewshot:2"}
    rates = {group.key: 1e-2}
    bias = [c for c in profile.runs(rates=rates) if c.method == "bias"]
    assert len(bias) == 4 and {c.lr for c in bias} == {1e-2}
    assert not profile.pending(rates=rates)


@pytest.mark.parametrize("entry, message", [
    ('bias = { select = [] }', "must be a number or"),
    ('bias = { select = [1e-3, 1e-3] }', "repeat a value"),
    ('bias = { select = [0.0, 1e-3] }', "numbers > 0"),
    ('bias = { pick = [1e-3] }', "must be a number or"),
    ('bias = -1.0', "lr.bias must be a learning rate"),
    ('bias = { select = [1e-3, "x"] }', "numbers > 0"),
])
def test_bad_candidate_rates_fail_at_load(tmp_path, entry, message):
    path = tmp_path / "bad.toml"
    path.write_text(PROFILE.replace("bias = { select = [1e-2, 1e-3] }", entry))
    with pytest.raises(ConfigError, match=message):
        grid.load_profile(path)


def test_unknown_lr_selection_key_fails_at_load(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(PROFILE.replace("rounds = 1\n", "rounds = 1\nepochs = 3\n"))
    with pytest.raises(ConfigError, match="epochs.*valid keys: val_fraction, rounds, seed, extend"):
        grid.load_profile(path)


def test_the_grid_sweeps_chooses_then_runs_at_the_chosen_rate(profile, tmp_results, capsys):
    counts = grid.plan(profile, tmp_results)
    assert counts["lr sweeps"] == (2, 0, 0)
    assert counts["tuning_methods"] == (4, 0, 2)  # 2 head runs, 2 bias runs with rate pending

    records = grid.ensure(profile, tmp_results, "tuning_methods", jobs=1, progress=False)
    (group,) = profile.groups()
    sweeps = [store.read_record(store.record_path(tmp_results, c)) for c in group.sweeps]
    assert all(r["status"] == "ok" for r in sweeps)
    for rec in sweeps:  # sweep records hold validation metrics only
        names = set(rec["final"]) | {k for row in rec["rounds"] for k in row}
        assert "val_acc" in rec["final"] and not [n for n in names if "test" in n]
    chosen, _ = selection.choose(sweeps)
    bias = [r for r in records if r["config"]["method"] == "bias"]
    assert len(records) == 4 and {r["config"]["lr"] for r in bias} == {chosen}
    assert grid.plan(profile, tmp_results)["tuning_methods"] == (4, 4, 0)

    table = report.lr_choices(profile, tmp_results)
    assert table["chosen lr"].tolist() == [chosen] and table["sweep"].tolist() == ["done"]
    assert "2 sweep runs (2 done) of 1 round on seed 3" in report.lr_cost(profile, tmp_results)

    # another winner (hand-edited validation accuracies) means other main runs: new hashes
    loser = next(r for r in sweeps if r["config"]["lr"] != chosen)
    path = store.record_path(tmp_results, RunConfig.from_dict(loser["config"]))
    loser["final"]["val_acc"] = 2.0
    path.write_text(json.dumps(loser))
    assert grid.rates(profile, tmp_results) == {group.key: loser["config"]["lr"]}
    assert grid.plan(profile, tmp_results)["tuning_methods"] == (4, 2, 0)


def _write_sweep(folder, cfg: RunConfig, val_acc: float, test_acc: float = 0.5) -> None:
    rec = _record(cfg.lr, val_acc, test_acc=test_acc) | {"hash": cfg.hash,
                                                          "config": cfg.to_dict()}
    path = store.record_path(folder, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_beyond_steps_past_the_edge_by_the_candidates_own_ratio():
    assert selection.beyond((1e-3, 3e-3, 1e-2), 1e-2) == pytest.approx(1e-2 * 10 / 3)
    assert selection.beyond((1e-3, 3e-3, 1e-2), 1e-3) == pytest.approx(1e-3 / 3)
    assert selection.beyond((1e-3, 3e-3, 1e-2), 3e-3) is None  # interior: final
    assert selection.beyond((1e-3,), 1e-3) is None


def test_extension_sweeps_past_an_edge_winner_at_most_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "read_record", _reader())
    group = selection.make_group(RunConfig(model="vit-tiny", weights="none", method="bias",
                                           lr=None), (1e-3, 1e-2), {}, selection.Settings(), 0)
    for cfg, acc in zip(group.sweeps, (0.5, 0.6), strict=True):
        _write_sweep(tmp_path, cfg, acc)
    assert selection.decide([group], tmp_path) == {}  # the winner 1e-2 sits at the edge
    first = selection.extend(group, tmp_path)
    assert first.candidates == (1e-3, 1e-2, 0.1) and first.extensions == (0.1,)
    _write_sweep(tmp_path, first.sweeps[-1], 0.7)  # the new edge wins again: one more step
    second = selection.extend(group, tmp_path)
    assert second.extensions == (0.1, 1.0)
    _write_sweep(tmp_path, second.sweeps[-1], 0.8)  # wins again, but two steps is the limit
    (choice,) = selection.decide([group], tmp_path).values()
    assert choice.lr == 1.0 and choice.group.candidates == (1e-3, 1e-2, 0.1, 1.0)
    assert len(selection.sweeps([group], tmp_path)) == 4
    again = selection.decide([group], tmp_path)[group.key]  # deterministic, from records
    assert again.lr == choice.lr and again.group == choice.group


def test_an_interior_winner_is_final_and_test_metrics_never_extend(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "read_record", _reader())
    group = selection.make_group(RunConfig(model="vit-tiny", weights="none", method="bias",
                                           lr=None), (1e-3, 3e-3, 1e-2), {},
                                 selection.Settings(), 0)
    for cfg, acc, test in zip(group.sweeps, (0.5, 0.7, 0.6), (0.9, 0.1, 0.2), strict=True):
        _write_sweep(tmp_path, cfg, acc, test)
    (choice,) = selection.decide([group], tmp_path).values()
    assert choice.lr == 3e-3 and choice.group.extensions == ()


def _reader():
    """read_record without the schema check (the hand-made sweep records are partial)."""
    def read(path, warn=True):
        path = Path(path)
        return json.loads(path.read_text()) if path.exists() else None
    return read
