"""The Flower engine gives the built-in loop's numbers; how the engine enters a run's identity.

The equality tests run Flower's simulation engine (Ray actors on this machine), so they need
the ``flower`` extra; the identity and bad-input tests do not. They share one local Ray
instance (see :func:`one_ray`), as a user's sweep of Flower simulations in one process may.
"""

import os
import sys

import pytest

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import builtin
from fedtune_core.runs import records as results
from fedtune_core.runs import store


def test_a_builtin_configs_identity_is_what_it_was_before_engines():
    # hashes computed with the commit before `engine` existed (53e7e20); random init, so
    # that the pin does not move with the recipes' VERSION (3 since pre-training was pinned
    # to one thread), which enters the identity of runs from recipe weights
    assert RunConfig(weights="none").hash == "4c54f568c5d28d27"
    assert RunConfig(method="lora", mode="local", weights="none").hash == "e385bf507cd748e4"
    assert "engine" not in RunConfig().to_dict()
    assert RunConfig(engine="builtin").hash == RunConfig().hash


def test_a_flower_run_is_a_run_of_its_own(tiny_config):
    cfg = tiny_config()
    flower = cfg.replace(engine="flower")
    assert flower.hash != cfg.hash
    assert flower.to_dict()["engine"] == "flower"
    assert RunConfig.from_dict(flower.to_dict()).hash == flower.hash


def test_a_record_without_engine_is_valid_and_builtin(tiny_config, tmp_path):
    cfg = tiny_config()
    record = results.failed_record(cfg, "killed")
    assert "engine" not in record["config"] and record["engine"] == "builtin"
    path = tmp_path / f"{cfg.hash}.json"
    assert store.problem(record, path) is None


@pytest.mark.parametrize("changes, words", [
    ({"engine": "flwr"}, ["'flwr'", "builtin", "flower"]),
    ({"engine": "flower", "mode": "local"}, ["'local'", "builtin"]),
])
def test_bad_engine_is_refused_naming_it(tiny_config, changes, words):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_builtin_loop_refuses_another_engines_config(tiny_config):
    with pytest.raises(ValueError, match="flower_app"):
        builtin.execute(tiny_config(engine="flower"))


def test_cli_refuses_a_bad_engine_writing_nothing(run_cli, tmp_results):
    code, out, err = run_cli(["run", "--engine", "ray", "--results", tmp_results])
    assert code == 2 and "engine 'ray'" in err and "flower" in err
    assert not any(tmp_results.iterdir())


def _flower():
    pytest.importorskip("flwr", reason="the Flower engine needs the extra: "
                                       "pip install -e '.[flower]'")
    from fedtune_core.fl import flower_app

    return flower_app


@pytest.fixture(scope="module")
def one_ray(start_local_ray):
    """One Ray instance for this module's simulations instead of one per run: Flower's Ray
    backend starts Ray only where none is running, and its ``terminate`` (which kills the
    run's actors, then shuts Ray down) leaves this one up until the module ends. Saves Ray's
    start and stop (about 3.5 s) per simulation; every run still gets new actors.

    One CPU, so one actor per simulation (Flower fits ``cluster CPUs / client num_cpus``
    actors): it serves every client of a round in turn, the case where one process's state
    could leak from one client into the next, and each simulation starts one process
    (torch, timm, the model: about 10 CPU-seconds) instead of two."""
    _flower()
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    path = os.pathsep.join(sys.path)  # what Flower's backend hands its actors
    start_local_ray(num_cpus=1, runtime_env={"env_vars": {"PYTHONPATH": path}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(raybackend.ray, "shutdown", lambda *args, **kwargs: None)
        yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit-tiny", "clip-tiny"])
@pytest.mark.parametrize("method", ["bias", "lora", "full"])
def test_flower_simulation_equals_the_builtin_loop(one_ray, tiny_config, model, method):
    flower_app = _flower()
    cfg = tiny_config(model=model, method=method, clients=3, sample=2, rounds=2)
    built_in, flower = builtin.execute(cfg), flower_app.execute(cfg.replace(engine="flower"))
    assert len(flower.rows) == len(built_in.rows) == cfg.rounds + 1
    for got, want in zip(flower.rows, built_in.rows, strict=True):
        for key in ("test_acc", "test_loss", "train_loss"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["round"], key)
        assert (got["bytes_up"], got["bytes_down"]) == (want["bytes_up"], want["bytes_down"])
    assert flower.final["samples_per_client"] == built_in.final["samples_per_client"]
    for key in ("local_test_acc", "train_acc", "bytes_up", "bytes_down"):
        assert flower.final[key] == pytest.approx(built_in.final[key], abs=1e-6), key
    assert (flower.trainable, flower.state_bytes) == (built_in.trainable, built_in.state_bytes)


@pytest.mark.slow
def test_fedtune_run_engine_flower_writes_a_record_naming_it(one_ray, run_cli, tmp_results,
                                                            tiny_config):
    _flower()
    code, out, err = run_cli(["run", "--engine", "flower", "--weights", "none", "--partition",
                              "iid", "--clients", 2, "--sample", 1, "--rounds", 1,
                              "--batch-size", 64, "--method", "head", "--results", tmp_results,
                              "--quiet"])
    assert code == 0, err
    cfg = tiny_config(method="head", sample=1, rounds=1, engine="flower")
    record = store.kept(tmp_results, cfg)
    assert record and record["engine"] == "flower" and record["config"]["engine"] == "flower"
    built_in = builtin.execute(cfg.replace(engine="builtin"))
    assert [r["test_acc"] for r in record["rounds"]] == pytest.approx(
        [r["test_acc"] for r in built_in.rows], abs=1e-6)


def test_a_profile_runs_its_fedavg_runs_on_the_engine_it_sets(tmp_path):
    from fedtune_core.study.profile import load_profile

    path = tmp_path / "flowered.toml"
    path.write_text('seeds = [0]\n[base]\nengine = "flower"\ndataset = "digits"\n'
                    'weights = "none"\nclients = 2\nsample = 2\nrounds = 1\n'
                    '[lr]\nbias = 1e-3\n'
                    '[[fl_vs_local]]\nmodel = "vit-tiny"\nmethod = "bias"\n'
                    'mode = ["fl", "local", "central"]\n')
    engines = {cfg.mode: cfg.engine for cfg in load_profile(path).runs()}
    assert engines == {"fl": "flower", "local": "builtin", "central": "builtin"}


class _Grid:
    """A Flower Grid stand-in whose nodes 11 and 12 answer on its ``answer_on``-th pull,
    except the ``silent`` ones, which never answer."""

    def __init__(self, answer_on: int, silent: tuple[int, ...] = ()):
        self.answer_on, self.silent, self.pulls, self.sent = answer_on, silent, 0, {}

    def get_node_ids(self):
        return [11, 12]

    def push_messages(self, msgs):
        for msg in msgs:
            self.sent[f"m{len(self.sent)}"] = msg
        return list(self.sent)[-len(msgs):]

    def pull_messages(self, ids):
        from types import SimpleNamespace

        self.pulls += 1
        if self.pulls < self.answer_on:
            return []
        return [SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=self.sent[i].metadata.dst_node_id,
                                     reply_to_message_id=i),
            content=f"reply of {self.sent[i].metadata.dst_node_id}", has_error=lambda: False)
            for i in ids if self.sent[i].metadata.dst_node_id not in self.silent]


class _Clock:
    """``time`` for flower_server: a second passes at each reading, sleeping takes none."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now

    def sleep(self, seconds):
        pass


def test_a_round_pulls_until_every_reply_is_in_and_a_silent_node_is_named(monkeypatch):
    _flower()
    from flwr.app import MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune_core.fl import flower_server

    # a ServerApp's messages carry the ids of its task, run and node, which Flower sets before
    # the app runs; no app runs here (without them the test passed only after a simulation in
    # the same process)
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    monkeypatch.setattr(flower_server, "time", _Clock())
    grid = _Grid(answer_on=4)
    link = flower_server._Link(grid, timeout=100.0)
    replies = link.exchange(MessageType.TRAIN, [1, 0], {0: 11, 1: 12}, 3, lambda: RecordDict())
    assert replies == ["reply of 12", "reply of 11"] and grid.pulls == 4

    quiet = _Grid(answer_on=1, silent=(12,))
    link = flower_server._Link(quiet, timeout=10.0)
    with pytest.raises(flower_server.NodeLost, match=r"partition 1 \(SuperNode 12\) in train "
                                                     r"round 3 was lost: no reply after"):
        link.exchange(MessageType.TRAIN, [0, 1], {0: 11, 1: 12}, 3, lambda: RecordDict())
    assert 5 <= quiet.pulls <= 10  # it kept pulling for the missing reply until the guard
