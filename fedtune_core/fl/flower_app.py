"""The Flower engine: fedtune's own client and server steps as a Flower ClientApp and ServerApp.

Built on Flower's Message API (``flwr`` 1.42, the optional extra ``flower``). The client
builds the model once per process, applies the run's tuning method, takes its split from
fedtune's seeded partitioner by its ``partition-id``, and answers three messages: ``query``
(which partition it holds), ``train`` (load the received trainable state, train with the
same :class:`~fedtune_core.fl.training.Trainer`, reply with its trainable state and sample count)
and ``evaluate`` (the final model on its own splits). The server
(:mod:`fedtune_core.fl.flower_server`) starts from the same initial state, follows fedtune's
seeded client schedule and averages with :func:`~fedtune_core.fl.fedavg.fedavg`, so a config gives
the same numbers in either engine. Only the trainable state travels.

Two ways to run it: :func:`execute` (``fedtune run --engine flower``: Flower's simulation
engine, in this process and Ray actors), and ``flwr run flower/`` against a SuperLink and
SuperNodes (the apps in :mod:`fedtune_core.runs.flower_deploy`; the app folder is ``flower/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune_core import tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin, data, features, fedavg, flower_server, training
from fedtune_core.fl.flower_server import (
    CACHE_FEATURES,
    CONFIG,
    DATA_DIR,
    DEFAULTS,
    DEVICE,
    WEIGHTS,
)


def settings_of(cfg: RunConfig, **values: Any) -> dict[str, Any]:
    """The Flower run config that carries ``cfg`` (as JSON) and fedtune's other settings."""
    return DEFAULTS | {CONFIG: json.dumps(cfg.to_dict(), sort_keys=True)} | values


def config_of(settings: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` a Flower run config carries (validated as always)."""
    from fedtune_core.errors import ConfigError

    if CONFIG not in settings:
        raise ConfigError(f"the Flower run config has no {CONFIG!r}: pass the run's config as "
                          f"--run-config \"{CONFIG}='<JSON of a fedtune config>'\"")
    try:
        values = json.loads(settings[CONFIG])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{CONFIG} is not a JSON object ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{CONFIG} must be a JSON object of config fields, got {values!r}")
    return RunConfig.from_dict(values).replace(engine="flower")


@dataclass
class ClientSide:
    """What one process holds for a run: the model (built once), the partition's indices,
    and the clients it has served, on the device (each built on first use). When only the
    head trains and features are cached, ``trainer`` is its head view and each client's
    splits are encoded once (:mod:`fedtune_core.fl.features`)."""

    cfg: RunConfig
    trainer: training.Trainer
    dataset: data.Dataset
    indices: list[tuple[Any, Any]]  # per partition: (train, own test) indices
    clients: dict[int, training.Client] = field(default_factory=dict)

    def client(self, pid: int) -> training.Client:
        """Partition ``pid``'s own splits (encoded once when only the head trains)."""
        if pid not in self.clients:
            train_idx, test_idx = self.indices[pid]
            dev = self.trainer.device
            splits = [self.dataset.train.subset(i).to(dev) for i in (train_idx, test_idx)]
            if isinstance(self.trainer, features.HeadView):
                splits = features.encode(self.trainer, *splits)
            self.clients[pid] = training.Client(*splits)
        return self.clients[pid]


_SIDE: dict[tuple, ClientSide] = {}  # this process's model: one run at a time
Resolve = Callable[[RunConfig], "str | None"]  # a config's recipe weights -> checkpoint file


def client_side(settings: Mapping[str, Any], resolve: Resolve | None = None) -> ClientSide:
    """This process's :class:`ClientSide` for the run ``settings`` describe (built once).

    The model is built from ``settings[WEIGHTS]`` where the settings carry it, else from the
    file ``resolve(cfg)`` names (a deployment's node: recipe weights), else from the
    config's weights.
    """
    cfg = config_of(settings)
    key = (cfg.hash, settings.get(DEVICE), settings.get(DATA_DIR))
    if key not in _SIDE:
        _SIDE.clear()  # a new run: let the last one's model go
        training.set_cpu_threads()
        dev = training.pick_device(settings.get(DEVICE, "auto"))
        dataset, parts = builtin.load_split(cfg, settings.get(DATA_DIR) or None)
        path = settings.get(WEIGHTS) or (resolve(cfg) if resolve else None)
        model = builtin.build_model(cfg, dataset, path)
        names = tuning.prepare(model, cfg.method, cfg.method_options)
        trainer = training.Trainer(model, names, cfg, dev)
        cache = bool(settings.get(CACHE_FEATURES, True)) and trainer.encoder_frozen
        _SIDE[key] = ClientSide(cfg, features.HeadView(trainer) if cache else trainer, dataset,
                                builtin.client_indices(cfg, parts))
    return _SIDE[key]


def _partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def client_app_for(settings: Mapping[str, Any] | None = None,
                   resolve: Resolve | None = None) -> ClientApp:
    """A ClientApp running fedtune's client step; ``settings`` (None: each run's own run
    config, as under ``flwr run``) say which run; ``resolve`` as in :func:`client_side`."""
    app = ClientApp()

    def side(context: Context) -> ClientSide:
        return client_side(settings if settings is not None else context.run_config, resolve)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(
            {"partition-id": _partition_id(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        here, pid = side(context), _partition_id(context)
        state = msg.content["arrays"].to_torch_state_dict()
        r = int(msg.content["config"]["round"])
        update, n, loss = fedavg.client_step(here.cfg, here.trainer, state, here.client(pid),
                                             r, pid)
        return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(
            {"num-examples": n, "train-loss": loss})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        here, pid = side(context), _partition_id(context)
        here.trainer.load(msg.content["arrays"].to_torch_state_dict())
        client = here.client(pid)
        return Message(RecordDict({"metrics": MetricRecord(
            {"local-test-acc": here.trainer.evaluate(client.test)[0],
             "train-acc": here.trainer.evaluate(client.train)[0]})}), reply_to=msg)

    return app


def server_app_for(main: Callable[[Grid, Context], None]) -> ServerApp:
    """A ServerApp whose main function is ``main(grid, context)``."""
    app = ServerApp()
    app.main()(main)
    return app


def execute(cfg: RunConfig, device: str | None = None, data_root: str | None = None,
            progress: bool = False, cache_features: bool = True,
            weights_file: str | None = None) -> builtin.Outcome:
    """Run ``cfg`` through Flower's simulation engine (one virtual SuperNode per client);
    what :func:`fedtune_core.fl.builtin.execute` returns for ``engine = "flower"``."""
    from flwr.simulation import run_simulation

    settings = settings_of(cfg, **{DEVICE: device or "auto", DATA_DIR: data_root or "",
                                   CACHE_FEATURES: cache_features, WEIGHTS: weights_file or ""})
    done: dict[str, Any] = {}

    def main(grid: Grid, context: Context) -> None:
        try:
            done["outcome"] = flower_server.serve(grid, cfg, settings)
        except BaseException as err:  # handed to the caller below, not lost in Flower's thread
            done["error"] = err

    actors = max(1, min(cfg.sample, os.cpu_count() or 1))
    run_simulation(server_app_for(main), client_app_for(settings), num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": actors,
                                                 "include_dashboard": False}})
    if "error" in done:
        raise done["error"]
    if "outcome" not in done:
        raise RuntimeError("Flower's simulation ended without running the ServerApp")
    return done["outcome"]
