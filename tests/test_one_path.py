"""`fedtune run` and `fedtune grid` reach a record through one path: runs/claims.py.

The spy stands in for :func:`fedtune_core.runs.claims.ensure` (claim, compute, write), so
nothing is computed here; the runs themselves are tested in test_results.py, test_store.py
and test_faults.py through the same path.
"""

from test_bad_inputs import _tiny_profile

from fedtune_core import cli
from fedtune_core.runs import claims
from fedtune_core.study import grid

BASE = 'weights = "none"\npartition = "iid"\nclients = 2\nsample = 2\nbatch_size = 64'


def _spy(monkeypatch) -> list[list[str]]:
    seen: list[list[str]] = []

    def ensure(todo, results, compute, **options):
        seen.append([cfg.hash for cfg in todo])
        assert list(compute(list(todo), lambda cfg: False)) == []  # nothing claimed: no run
        return {}

    monkeypatch.setattr(claims, "ensure", ensure)
    return seen


def test_fedtune_run_is_a_grid_of_one_config(monkeypatch, tmp_path):
    seen = _spy(monkeypatch)
    args = cli.build_parser().parse_args(["run", "--weights", "none", "--clients", "2",
                                          "--sample", "2", "--rounds", "1"])
    cfg = cli._config_from(args)
    assert claims.run(cfg, tmp_path / "res") is None  # the spy wrote nothing
    assert seen == [[cfg.hash]]


def test_fedtune_grid_goes_through_the_same_path(monkeypatch, tmp_path):
    seen = _spy(monkeypatch)
    profile = grid.load_profile(str(_tiny_profile(tmp_path, BASE)))
    records = grid.ensure(profile, tmp_path / "res", jobs=1, progress=False)
    planned = {cfg.hash for cfg in profile.runs(None, {})}
    assert {h for todo in seen for h in todo} == planned and len(planned) == 2
    assert list(records) == [] and len(records.absent) == 2  # nothing written by the spy
