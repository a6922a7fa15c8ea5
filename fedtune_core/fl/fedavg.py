"""FedAvg: the server's rounds, the client and server steps, and the averaging.

What travels is the trainable state only, ``{name: tensor}``; a client loads it into the
one shared model, trains (:class:`~fedtune_core.fl.training.Trainer`), and hands back its
new state and sample count; the server averages (:func:`fedavg`). Bytes are measured from
the tensors that travel. The same client and server steps run in every engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from fedtune_core.config import RunConfig
from fedtune_core.errors import check_finite
from fedtune_core.fl import data
from fedtune_core.fl.training import Client, State, Trainer


def fedavg(updates: Iterable[tuple[State, int]]) -> State:
    """Average client states weighted by their sample counts.

    Consumes ``updates`` one at a time, so a generator of client updates needs memory for
    one running sum and one client state, not one state per client.

    Raises:
        ValueError: no updates, a non-positive count, or states with different names or
            shapes.
    """
    total, acc = 0, None
    for state, n in updates:
        if n <= 0:
            raise ValueError(f"a client update must have a positive sample count, got {n}")
        if acc is None:
            acc = {k: v.detach().float() * n for k, v in state.items()}
            dtypes = {k: v.dtype for k, v in state.items()}
        elif state.keys() != acc.keys():
            raise ValueError("client states hold different parameter names")
        else:
            for k, v in state.items():
                if v.shape != acc[k].shape:
                    raise ValueError(f"client states disagree on the shape of {k!r}: "
                                     f"{tuple(v.shape)} vs {tuple(acc[k].shape)}")
                acc[k] += v.detach().float() * n
        total += n
    if acc is None:
        raise ValueError("fedavg needs at least one client update")
    return {k: (v / total).to(dtypes[k]) for k, v in acc.items()}


def state_bytes(state: State) -> int:
    """Bytes a state takes on the wire: sum of numel x element size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def eval_round(cfg: RunConfig, r: int) -> bool:
    return r % cfg.eval_every == 0 or r == cfg.rounds


def schedule(cfg: RunConfig) -> list[np.ndarray]:
    """The clients FedAvg's seeded sampler picks in each round (sorted ids, one array a round).

    Every mode follows it, so the local and centralised baselines of a config do the same
    work as its FedAvg run: a local client trains in exactly the rounds FedAvg picks it.
    """
    sampler = np.random.default_rng([cfg.seed, 1])
    return [np.sort(sampler.choice(cfg.clients, cfg.sample, replace=False))
            for _ in range(cfg.rounds)]


def row(r: int, test: tuple[float, float] | None, train_loss: float, up: int, down: int,
         seconds: float, **extra: Any) -> dict[str, Any]:
    """One round's metrics. Raises :class:`Diverged` if a loss or accuracy is not finite."""
    acc, loss = test if test else (None, None)
    check_finite(r, {"train_loss": train_loss, "test_loss": loss, "test_acc": acc})
    return {"round": r, "test_acc": acc, "test_loss": loss, "train_loss": train_loss,
            "bytes_up": up, "bytes_down": down, "seconds": seconds, **extra}


def client_step(cfg: RunConfig, trainer: Trainer, state: State, client: Client, r: int,
                c: int) -> tuple[State, int, float]:
    """One client's part of round ``r``: load the server's ``state``, train E local epochs
    on its own split (data order from seed, round and client id ``c``), hand back
    (new state, sample count, mean training loss). The same step runs in every engine."""
    trainer.load(state)
    loss = trainer.fit(client.train, cfg.local_epochs, (cfg.seed, r, int(c)))
    return trainer.state(), len(client.train), loss


def server_step(cfg: RunConfig, trainer: Trainer, evaluation: data.Split, r: int,
                updates: Iterable[tuple[State, int]]) -> tuple[State, tuple[float, float] | None]:
    """The server's part of round ``r``: average ``updates`` (:func:`fedavg`), load the
    result, and evaluate it where the round asks for it; (new state, (acc, loss) or None)."""
    state = fedavg(updates)
    trainer.load(state)
    return state, trainer.evaluate(evaluation) if eval_round(cfg, r) else None


def _client_updates(cfg: RunConfig, trainer: Trainer, state: State, chosen: list[Client],
                    ids: np.ndarray, r: int, log: dict[str, list]) -> Iterator[tuple[State, int]]:
    """Each chosen client in turn: receive ``state``, train, send its state and sample count."""
    for client, c in zip(chosen, ids, strict=True):
        update, n, loss = client_step(cfg, trainer, state, client, r, int(c))
        log["loss"].append(loss)
        log["bytes"].append(state_bytes(update))
        log["samples"][c] += cfg.local_epochs * n
        yield update, n


def samples_metrics(per_client: np.ndarray) -> dict[str, Any]:
    return {"samples_processed": int(per_client.sum()),
            "samples_per_client": [int(n) for n in per_client]}


def run_fl(cfg: RunConfig, trainer: Trainer, clients: list[Client], test: data.Split,
           progress: bool) -> tuple[list[dict], dict]:
    """FedAvg: K of N clients per round, E local epochs each, sample-weighted averaging."""
    state = trainer.state()
    samples = np.zeros(len(clients), dtype=np.int64)
    rows = []
    for r, chosen in enumerate(tqdm(schedule(cfg), desc="rounds", leave=False,
                                    disable=not progress), start=1):
        t0 = time.perf_counter()
        log: dict[str, Any] = {"loss": [], "bytes": [], "samples": samples}
        down = cfg.sample * state_bytes(state)
        state, evaluated = server_step(cfg, trainer, test, r, _client_updates(
            cfg, trainer, state, [clients[c] for c in chosen], chosen, r, log))
        rows.append(row(r, evaluated, float(np.mean(log["loss"])), sum(log["bytes"]), down,
                         time.perf_counter() - t0))
    return rows, final_shared(trainer, clients, rows) | samples_metrics(samples)


def final_shared(trainer: Trainer, clients: list[Client], rows: list[dict]) -> dict:
    """Final metrics of one shared model (FedAvg, central): global and per-client."""
    own_test = trainer.per_client(clients, "test")
    return {"test_acc": rows[-1]["test_acc"], "test_loss": rows[-1]["test_loss"],
            "test_acc_std": 0.0,
            "local_test_acc": float(own_test.mean()), "local_test_acc_std": float(own_test.std()),
            "train_acc": float(trainer.per_client(clients, "train").mean())}
