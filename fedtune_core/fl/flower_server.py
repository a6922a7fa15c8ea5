"""The server side of the Flower engine: fedtune's FedAvg rounds, driven through a Flower Grid.

:func:`serve` starts from the run's initial state, asks each SuperNode which partition it
holds, then in every round sends the server's trainable state to the clients fedtune's
seeded schedule picks, averages their replies with :func:`~fedtune_core.fl.fedavg.fedavg` and
evaluates on the global test set. A node that is lost (its reply is an error, e.g. Flower's
``NODE_UNAVAILABLE`` once its heartbeat stops, or no reply within the hang guard) ends the
run with :class:`NodeLost`, naming the partition and node: the run is recorded as failed,
never averaged without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune_core import tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin, features, fedavg, training

# keys of a Flower run config (``flwr run --run-config``) that fedtune reads
CONFIG, RESULTS, DEVICE, DATA_DIR = "fedtune-config", "results", "device", "data-dir"
CACHE_FEATURES, REPLY_TIMEOUT, NODE_TIMEOUT = "cache-features", "reply-timeout", "node-timeout"
PULL_INTERVAL = 0.2  # seconds between pulls for the replies of a round's messages
# the checkpoint file recipe weights resolve to, set by whoever starts the run (not a key of
# the app's run config: a deployment's nodes resolve it themselves, see client_app_for)
WEIGHTS = "weights-file"
DEFAULTS: dict[str, Any] = {RESULTS: "results/flower", DEVICE: "auto", DATA_DIR: "",
                            CACHE_FEATURES: True, REPLY_TIMEOUT: 3600.0, NODE_TIMEOUT: 600.0}


def carried(record: ArrayRecord) -> int:
    """Bytes of the tensors an ArrayRecord carries: numel x element size of each array (what
    :func:`fedtune_core.fl.fedavg.state_bytes` counts, without the serialisation's headers)."""
    return sum(array.numpy().nbytes for array in record.values())


class NodeLost(RuntimeError):
    """A SuperNode did not answer, or answered with an error; the message names it."""


def serve(grid: Grid, cfg: RunConfig, settings: Mapping[str, Any]) -> builtin.Outcome:
    """Run FedAvg for ``cfg`` over the SuperNodes of ``grid``; the run's outcome.

    Raises:
        NodeLost: too few SuperNodes connected, partitions that do not cover the federation,
            or a node lost mid-run (its partition and node id in the message).
    """
    dev = training.pick_device(settings.get(DEVICE, "auto"))
    dataset, parts = builtin.load_split(cfg, settings.get(DATA_DIR) or None)
    model = builtin.build_model(cfg, dataset, settings.get(WEIGHTS) or None)
    if cfg.val_fraction:
        held = [b for _, b in builtin.client_indices(cfg, parts)]
        evaluation = dataset.train.subset(np.concatenate(held)).to(dev)
    else:
        evaluation = dataset.test.to(dev)
    as_built = training.Trainer(model, [], cfg, dev).evaluate(evaluation)
    names = tuning.prepare(model, cfg.method, cfg.method_options)
    trainer = training.Trainer(model, names, cfg, dev)
    if settings.get(CACHE_FEATURES, True) and trainer.encoder_frozen:
        (evaluation,) = features.encode(trainer, evaluation)
        trainer = features.HeadView(trainer)
    initial = trainer.evaluate(evaluation)
    link = _Link(grid, float(settings.get(REPLY_TIMEOUT, 3600.0)))
    nodes = link.partitions(cfg.clients, float(settings.get(NODE_TIMEOUT, 600.0)))
    state, samples, rows = trainer.state(), np.zeros(cfg.clients, dtype=np.int64), []
    for r, chosen in enumerate(fedavg.schedule(cfg), start=1):
        t0 = time.perf_counter()
        sent = ArrayRecord(state)
        replies = link.exchange(MessageType.TRAIN, [int(c) for c in chosen], nodes, r,
                                lambda sent=sent, r=r: RecordDict(
                                    {"arrays": sent, "config": ConfigRecord({"round": r})}))
        counts = [int(rep["metrics"]["num-examples"]) for rep in replies]
        samples[chosen] += cfg.local_epochs * np.array(counts)
        updates = ((rep["arrays"].to_torch_state_dict(), n)
                   for rep, n in zip(replies, counts, strict=True))
        state, evaluated = fedavg.server_step(cfg, trainer, evaluation, r, updates)
        loss = float(np.mean([rep["metrics"]["train-loss"] for rep in replies]))
        up = sum(carried(rep["arrays"]) for rep in replies)
        rows.append(fedavg.row(r, evaluated, loss, up, len(chosen) * carried(sent),
                           time.perf_counter() - t0))
    final = _final(link, cfg, nodes, ArrayRecord(state), rows)
    return builtin.outcome(cfg, trainer, rows, final | fedavg.samples_metrics(samples),
                           as_built, initial)


def _final(link: _Link, cfg: RunConfig, nodes: dict[int, int], state: ArrayRecord,
           rows: list[dict]) -> dict[str, Any]:
    """The final model's metrics: global (the last round's) and on each client's own splits
    (evaluated on the clients, as :func:`fedtune_core.fl.fedavg.final_shared` does in one
    process)."""
    replies = link.exchange(MessageType.EVALUATE, list(range(cfg.clients)), nodes, cfg.rounds,
                            lambda: RecordDict({"arrays": state}))
    own_test = np.array([rep["metrics"]["local-test-acc"] for rep in replies])
    train = np.array([rep["metrics"]["train-acc"] for rep in replies])
    return {"test_acc": rows[-1]["test_acc"], "test_loss": rows[-1]["test_loss"],
            "test_acc_std": 0.0, "local_test_acc": float(own_test.mean()),
            "local_test_acc_std": float(own_test.std()), "train_acc": float(train.mean())}


class _Link:
    """Messages to SuperNodes by partition id, each reply checked; every wait bounded."""

    def __init__(self, grid: Grid, timeout: float):
        self.grid, self.timeout = grid, timeout

    def partitions(self, clients: int, wait: float) -> dict[int, int]:
        """partition id -> node id, once ``clients`` SuperNodes are connected (within
        ``wait`` seconds), each holding a different partition of 0..clients-1."""
        deadline = time.monotonic() + wait
        while len(ids := sorted(self.grid.get_node_ids())) < clients:
            if time.monotonic() > deadline:
                raise NodeLost(f"only {len(ids)} of the {clients} SuperNodes the config needs "
                               f"connected within {wait:g} s")
            time.sleep(1.0)  # Flower's Grid has no event for a node joining
        replies = self.exchange(MessageType.QUERY, ids, {i: i for i in ids}, 0,
                                lambda: RecordDict({}), query=True)
        held = {i: int(rep["metrics"]["partition-id"]) for i, rep in zip(ids, replies,
                                                                          strict=True)}
        found = sorted(held.values())
        if found[:clients] != list(range(clients)) or len(set(found)) != len(found):
            raise NodeLost(f"the SuperNodes hold partition-ids {found}; a config with "
                           f"{clients} clients needs each of 0..{clients - 1} exactly once")
        return {pid: node for node, pid in held.items()}

    def exchange(self, kind: str, pids: Sequence[int], nodes: dict[int, int], r: int,
                 content: Callable[[], RecordDict], query: bool = False) -> list[RecordDict]:
        """Send ``content()`` to each partition's node; the replies' contents in ``pids``
        order (``query``: ``pids`` are node ids, partitions not known yet). Raises
        :class:`NodeLost` naming the first partition whose reply is missing or an error."""
        msgs = [Message(content(), dst_node_id=nodes[p], message_type=kind, group_id=str(r))
                for p in pids]
        t0 = time.monotonic()
        replies = {m.metadata.src_node_id: m for m in self._send_and_receive(msgs)}
        out = []
        for p in pids:
            node = f"SuperNode {nodes[p]}"
            where = f"{node if query else f'partition {p} ({node})'} in {kind} round {r}"
            reply = replies.get(nodes[p])
            if reply is None:
                gone = nodes[p] not in set(self.grid.get_node_ids())
                why = ("it left the federation (no heartbeat)" if gone else
                       f"no reply after {time.monotonic() - t0:.0f} s "
                       f"(hang guard {self.timeout:g} s)")
                raise NodeLost(f"{where} was lost: {why}")
            if reply.has_error():
                raise NodeLost(f"{where} was lost: {reply.error.reason} "
                               f"(Flower error code {reply.error.code})")
            out.append(reply.content)
        return out

    def _send_and_receive(self, msgs: list[Message]) -> list[Message]:
        """``Grid.send_and_receive``, pulling every :data:`PULL_INTERVAL` seconds (Flower's
        gRPC grid pulls every 3 s: on seconds-long rounds, most of a round's wall time)."""
        waiting, got = set(self.grid.push_messages(msgs)), []
        deadline = time.monotonic() + self.timeout
        while True:
            replies = list(self.grid.pull_messages(waiting))
            got.extend(replies)
            waiting -= {m.metadata.reply_to_message_id for m in replies}
            if not waiting or time.monotonic() >= deadline:
                return got
            time.sleep(PULL_INTERVAL)
