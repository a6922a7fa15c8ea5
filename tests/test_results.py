"""Tests of fedtune_core.runs.records (records, cache, atomic writes) and RunConfig identity."""

import json
import math

import pytest

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import builtin
from fedtune_core.runs import claims, store
from fedtune_core.runs import records as results
from fedtune_core.study import tidy

RECORD_KEYS = {"schema", "hash", "config", "status", "rounds", "final", "params", "versions",
               "git", "hardware", "wall_seconds"}


def _files(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture
def count_execute(monkeypatch):
    """Wrap builtin.execute, counting its calls."""
    calls = []
    real = builtin.execute

    def counted(cfg, **kwargs):
        calls.append(cfg.hash)
        return real(cfg, **kwargs)

    monkeypatch.setattr(builtin, "execute", counted)
    return calls


def _forbid_execute(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("builtin.execute must not be called for a cached run")

    monkeypatch.setattr(builtin, "execute", boom)


def test_run_writes_one_complete_record(tmp_results, tiny_config, count_execute):
    cfg = tiny_config()
    record = claims.run(cfg, tmp_results, device="cpu")
    path = store.record_path(tmp_results, cfg)
    assert path == tmp_results / "runs" / f"{cfg.hash}.json"
    assert _files(tmp_results) == [path]
    assert count_execute == [cfg.hash]

    assert RECORD_KEYS <= set(record)
    assert record["status"] == "ok" and record["error"] is None
    assert record["schema"] == results.SCHEMA
    assert record["hash"] == cfg.hash
    assert record["config"] == cfg.to_dict()
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    assert 0 <= record["final"]["test_acc"] <= 1
    assert 0 < record["params"]["trainable"] < record["params"]["total"]
    assert record["state_bytes"] == 4 * record["params"]["trainable"]
    assert record["versions"]["torch"] and record["versions"]["python"]
    assert {"commit", "dirty"} <= set(record["git"])
    assert record["hardware"]["cpu_count"] >= 1
    assert record["wall_seconds"] > 0
    assert record["device"] == "cpu"

    on_disk = json.loads(path.read_text())
    assert on_disk == record
    assert store.kept(tmp_results, cfg) == record
    assert RunConfig.from_dict(on_disk["config"]).hash == cfg.hash


def test_second_run_is_a_cache_hit(tmp_results, tiny_config, monkeypatch):
    cfg = tiny_config(method="head", rounds=1)
    first = claims.run(cfg, tmp_results, device="cpu")
    _forbid_execute(monkeypatch)
    second = claims.run(cfg, tmp_results, device="cpu")
    assert second == first
    # an equal config (lr spelled out) is the same run
    assert claims.run(cfg.replace(lr=cfg.resolved_lr), tmp_results) == first
    assert len(_files(tmp_results)) == 1


def test_force_recomputes(tmp_results, tiny_config, count_execute):
    cfg = tiny_config(method="head", rounds=1)
    first = claims.run(cfg, tmp_results, device="cpu")
    second = claims.run(cfg, tmp_results, device="cpu", force=True)
    assert count_execute == [cfg.hash, cfg.hash]
    assert second["status"] == "ok"
    assert second["final"] == first["final"]  # deterministic
    assert json.loads(store.record_path(tmp_results, cfg).read_text()) == second
    assert len(_files(tmp_results)) == 1


def test_failed_run_is_recorded_and_retried(tmp_results, tiny_config, monkeypatch):
    cfg = tiny_config()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom in training")

    monkeypatch.setattr(builtin, "execute", broken)
    record = claims.run(cfg, tmp_results, device="cpu")
    assert record["status"] == "failed"
    assert record["error"] == "RuntimeError: boom in training"
    assert "boom in training" in record["traceback"]
    assert record["rounds"] == [] and record["final"] == {}
    path = store.record_path(tmp_results, cfg)
    assert json.loads(path.read_text())["status"] == "failed"
    assert store.kept(tmp_results, cfg) is None

    claims.run(cfg, tmp_results, device="cpu")  # not a cache hit: runs again
    assert len(calls) == 2
    assert store.load_records(tmp_results) == []
    assert len(store.load_records(tmp_results, status=None)) == 1


def test_config_error_propagates_and_writes_nothing(tmp_results, tiny_config, monkeypatch):
    cfg = tiny_config()

    def bad(*args, **kwargs):
        raise ConfigError("checkpoint unreadable")

    monkeypatch.setattr(builtin, "execute", bad)
    with pytest.raises(ConfigError, match="checkpoint unreadable"):
        claims.run(cfg, tmp_results)
    assert _files(tmp_results) == []

    record = claims.run(cfg, tmp_results, record_config_errors=True)
    assert record["status"] == "failed"
    assert record["error"] == "ConfigError: checkpoint unreadable"
    assert _files(tmp_results) == [store.record_path(tmp_results, cfg)]


def test_real_config_error_inside_the_run_writes_nothing(tmp_results, tiny_config):
    # shards:K with K > classes is only detected once the data are loaded
    cfg = tiny_config(partition="shards:11")
    with pytest.raises(ConfigError, match="shards:11"):
        claims.run(cfg, tmp_results, device="cpu")
    assert _files(tmp_results) == []


def test_unreadable_record_is_not_a_cache_hit(tmp_results, tiny_config):
    cfg = tiny_config()
    path = store.record_path(tmp_results, cfg)
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "ok", "schema": 1, "trunc')
    assert store.read_record(path) is None
    assert store.kept(tmp_results, cfg) is None
    path.write_text(json.dumps({"status": "ok", "schema": results.SCHEMA + 1}))
    assert store.kept(tmp_results, cfg) is None, "a record of another schema is stale"


# ---------------------------------------------------------------- atomic writes


def test_write_json_round_trip(tmp_path):
    import numpy as np

    path = tmp_path / "sub" / "r.json"
    store.write_json(path, {"a": 1, "x": np.float64(0.5), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"a": 1, "x": 0.5, "n": 3}


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes"])
def test_write_json_is_atomic(tmp_path, bad):
    path = tmp_path / "r.json"
    store.write_json(path, {"old": True})
    before = path.read_bytes()
    # the bad value comes after plenty of good output, so json.dump fails midway
    payload = {"a": list(range(5000)), "z": bad}
    with pytest.raises((TypeError, ValueError)):
        store.write_json(path, payload)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "no temp file may be left"


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
    import numpy as np

    path = tmp_path / "r.json"
    store.write_json(path, {"a": math.nan, "b": [1.0, math.inf, -math.inf],
                              "c": {"d": np.float64("nan")}, "e": (2.5, math.nan)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None, None],
                                            "c": {"d": None}, "e": [2.5, None]}


def test_write_json_turns_float32_nan_into_null(tmp_path):
    import numpy as np

    path = tmp_path / "r.json"
    store.write_json(path, {"a": np.float32("nan")})
    assert json.loads(path.read_text()) == {"a": None}


# ---------------------------------------------------------------- RunConfig identity


def test_hash_is_stable_over_equal_configs():
    a, b = RunConfig(), RunConfig()
    assert a.hash == b.hash
    assert len(a.hash) == 16 and int(a.hash, 16) >= 0
    assert RunConfig(lr=None).hash == RunConfig(lr=RunConfig().resolved_lr).hash
    assert RunConfig(method="lora").hash == RunConfig(method="lora",
                                                      method_options={"rank": 8}).hash
    assert RunConfig(method="lora").hash != RunConfig(method="lora",
                                                      method_options={"rank": 4}).hash
    assert RunConfig(seed=0).hash != RunConfig(seed=1).hash
    assert RunConfig(lr=0.01).hash != RunConfig(lr=0.02).hash
    assert RunConfig(method="bias").hash != RunConfig(method="head").hash


def test_default_lr_depends_on_method_and_optimizer():
    from fedtune_core import tuning

    for method in tuning.METHODS:
        for optimizer in ("sgd", "adamw"):
            cfg = RunConfig(method=method, optimizer=optimizer)
            assert cfg.resolved_lr == tuning.METHODS[method].lr[optimizer]
            assert cfg.to_dict()["lr"] == cfg.resolved_lr
    assert RunConfig(lr=0.123).resolved_lr == 0.123


@pytest.mark.parametrize("changes", [{}, {"method": "prompt", "method_options": {"tokens": 5}},
                                     {"lr": 0.3, "seed": 7, "mode": "local"}])
def test_from_dict_round_trip(changes):
    cfg = RunConfig(**changes)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.hash == cfg.hash
    assert again.to_dict() == cfg.to_dict()
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="colour"):
        RunConfig.from_dict({"colour": "red"})


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 3
    with pytest.raises(TypeError):
        cfg.method_options["rank"] = 3


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"model": "vit-huge"}, "vit-huge"),
        ({"method": "lorra"}, "lorra"),
        ({"dataset": "mnist"}, "mnist"),
        ({"partition": "zipf:2"}, "zipf:2"),
        ({"partition": "dirichlet:0"}, "0"),
        ({"partition": "dirichlet:-1"}, "-1"),
        ({"mode": "solo"}, "solo"),
        ({"optimizer": "lbfgs"}, "lbfgs"),
        ({"clients": 3, "sample": 4}, "4"),
        ({"rounds": 0}, "rounds"),
        ({"clients": 0}, "clients"),
        ({"lr": 0.0}, "lr"),
        ({"local_epochs": 1.5}, "1.5"),
        ({"method": "lora", "method_options": {"rnk": 2}}, "rnk"),
        ({"weights": "bogus-tag"}, "bogus-tag"),
    ],
)
def test_bad_config_names_the_bad_value(changes, needle):
    with pytest.raises(ConfigError) as info:
        RunConfig(**changes)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize("seed", [-1, True, 1.5])
def test_bad_seed_is_a_config_error(seed):
    with pytest.raises(ConfigError, match="seed"):
        RunConfig(seed=seed)


@pytest.mark.parametrize(
    "changes, valid",
    [({"model": "x"}, "vit-tiny"), ({"method": "x"}, "lora"), ({"dataset": "x"}, "digits"),
     ({"mode": "x"}, "central"), ({"optimizer": "x"}, "adamw"), ({"partition": "x"}, "iid")],
)
def test_bad_choice_lists_valid_choices(changes, valid):
    with pytest.raises(ConfigError, match=f"valid choices.*{valid}"):
        RunConfig(**changes)


# ---------------------------------------------------------------- tables


def test_frames_and_method_label(tmp_results, tiny_config):
    cfg = tiny_config(method="prompt", method_options={"depth": "deep", "tokens": 3}, rounds=1)
    record = claims.run(cfg, tmp_results, device="cpu")
    assert tidy.method_label(record["config"]) == "prompt-3-deep"
    assert tidy.method_label(tiny_config(method="prompt").to_dict()) == "prompt"
    runs = tidy.runs_frame(store.load_records(tmp_results))
    assert len(runs) == 1
    assert runs.loc[0, "hash"] == cfg.hash
    assert runs.loc[0, "opt_depth"] == "deep"
    assert runs.loc[0, "final_test_acc"] == record["final"]["test_acc"]
    rounds = tidy.rounds_frame([record])
    assert list(rounds["round"]) == [0, 1]
