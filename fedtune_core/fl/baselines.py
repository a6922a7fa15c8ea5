"""The local-only and centralised baselines, compute-matched to FedAvg.

Both follow FedAvg's seeded client schedule (:func:`fedtune_core.fl.fedavg.schedule`), so
a baseline does the same work as the FedAvg run of its config.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from fedtune_core.config import RunConfig
from fedtune_core.fl import data
from fedtune_core.fl.fedavg import eval_round, final_shared, row, samples_metrics, schedule
from fedtune_core.fl.training import Client, Trainer


def run_central(cfg: RunConfig, trainer: Trainer, clients: list[Client], test: data.Split,
                progress: bool) -> tuple[list[dict], dict]:
    """All clients' training data pooled, compute-matched to FedAvg.

    In each round the pooled model processes as many samples as FedAvg's sampled clients
    do in that round (E x their training samples), drawn from a stream of shuffled passes
    over the pooled data (a fresh permutation whenever one runs out).
    """
    pooled = data.Split(torch.cat([c.train.images for c in clients]),
                        torch.cat([c.train.labels for c in clients]))
    owner = np.repeat(np.arange(len(clients)), [len(c.train) for c in clients])
    stream = _shuffled_stream(len(pooled), np.random.default_rng([cfg.seed, 3]))
    samples = np.zeros(len(clients), dtype=np.int64)
    rows = []
    for r, chosen in enumerate(tqdm(schedule(cfg), desc="rounds", leave=False,
                                    disable=not progress), start=1):
        t0 = time.perf_counter()
        count = cfg.local_epochs * sum(len(clients[c].train) for c in chosen)
        order = np.fromiter(stream, dtype=np.int64, count=count)
        loss = trainer.train_on(pooled, [order])
        samples += np.bincount(owner[order], minlength=len(clients))
        evaluated = trainer.evaluate(test) if eval_round(cfg, r) else None
        rows.append(row(r, evaluated, loss, 0, 0, time.perf_counter() - t0))
    return rows, final_shared(trainer, clients, rows) | samples_metrics(samples)


def _shuffled_stream(n: int, rng: np.random.Generator) -> Iterator[int]:
    """Indices 0..n-1 in a fresh random order, pass after pass, for ever."""
    while True:
        yield from rng.permutation(n).tolist()


def run_local(cfg: RunConfig, trainer: Trainer, clients: list[Client], test: data.Split,
              progress: bool) -> tuple[list[dict], dict]:
    """Each client trains alone, compute-matched to FedAvg: in exactly the rounds FedAvg's
    sampler picks it, E local epochs with a fresh optimizer and the same data order.

    Rows hold the mean (and spread) over clients of each client's own model; a client's
    model is evaluated again only when it has trained since its last evaluation.
    """
    init, picked = trainer.state(), schedule(cfg)
    n, rounds = len(clients), cfg.rounds
    acc, loss = np.full((n, rounds), np.nan), np.full((n, rounds), np.nan)
    train_loss, seconds = np.full((n, rounds), np.nan), np.zeros((n, rounds))
    own_test, own_train = np.zeros(n), np.zeros(n)
    samples = np.zeros(n, dtype=np.int64)
    untrained = trainer.evaluate(test)
    for c in tqdm(range(n), desc="clients", leave=False, disable=not progress):
        trainer.load(init)
        current = untrained  # (accuracy, loss) of client c's model as it is now
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            if c in picked[r - 1]:
                train_loss[c, r - 1] = trainer.fit(clients[c].train, cfg.local_epochs,
                                                   (cfg.seed, r, c))
                samples[c] += cfg.local_epochs * len(clients[c].train)
                current = None
            if eval_round(cfg, r):
                current = current or trainer.evaluate(test)
                acc[c, r - 1], loss[c, r - 1] = current
            seconds[c, r - 1] = time.perf_counter() - t0
        own_test[c] = trainer.evaluate(clients[c].test)[0]
        own_train[c] = trainer.evaluate(clients[c].train)[0]
    rows = []
    for r in range(1, rounds + 1):
        col = r - 1
        evaluated = (acc[:, col].mean(), loss[:, col].mean()) if eval_round(cfg, r) else None
        rows.append(row(r, evaluated, float(np.nanmean(train_loss[:, col])), 0, 0,
                         float(seconds[:, col].sum()),
                         test_acc_std=float(acc[:, col].std()) if evaluated else None))
    last = rows[-1]
    final = {"test_acc": last["test_acc"], "test_loss": last["test_loss"],
             "test_acc_std": last["test_acc_std"],
             "local_test_acc": float(own_test.mean()), "local_test_acc_std": float(own_test.std()),
             "train_acc": float(own_train.mean())}
    return rows, final | samples_metrics(samples)
