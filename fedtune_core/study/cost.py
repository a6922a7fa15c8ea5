"""What a profile's runs cost: the images each run processes, counted from its config.

Shared by ``benchmarks/gpu_hours.py`` (an estimate from one public anchor) and the
rehearsal (:mod:`fedtune_core.study.rehearsal`: the same counts times measured seconds). Every
mode is compute-matched to FedAvg (local clients train in the rounds FedAvg's sampler
picks them; central processes FedAvg's samples per round). Assumptions of the anchored
estimate: training an image costs 3 forwards with full fine-tuning and 2 with the
lightweight methods; head-only runs the encoder once over the training pool and the test
set (cached features) and the head costs nothing; every backbone reaches the anchor's FLOP
rate.
"""

from __future__ import annotations

import numpy as np

from fedtune_core.config import RunConfig
from fedtune_core.fl import partition

FWD_GFLOPS = {"vit-b16": 35.2, "clip-vit-b32": 8.8, "vit-b32": 8.7}  # per 224 image forward
SIZES = {"cifar10": (50_000, 10_000, 10), "cifar100": (50_000, 10_000, 100)}  # train, test, K
ANCHOR_IMG_S = 1459.0  # ViT-B/16 training images/s on one H100


def forwards_per_trained_image(method: str) -> int:
    """Forward-pass equivalents of training one image: 3 (full), 2 (lightweight methods)."""
    return 3 if method == "full" else 2


def images(cfg: RunConfig, sizes: tuple[int, int, int] | None = None) -> tuple[float, float]:
    """(images trained on, images only forwarded) by one run of ``cfg``.

    ``sizes``: (training pool, test set, classes) of the dataset; default :data:`SIZES`.
    A validation run (a learning-rate sweep) holds ``val_fraction`` of each client's
    training split out and evaluates on those images instead of the test set.
    """
    n_train, n_test, classes = sizes or SIZES[cfg.dataset]
    labels = np.repeat(np.arange(classes), n_train // classes)  # a balanced pool
    parts = partition.split_clients(labels, cfg.partition, cfg.clients, cfg.seed,
                                    cfg.local_test_fraction, num_classes=classes)
    train = np.array([len(t) for t in parts.train], dtype=float) * (1 - cfg.val_fraction)
    held = sum(len(t) for t in parts.train) * cfg.val_fraction
    evaluation = held if cfg.val_fraction else n_test
    own = train.sum() + (held or sum(len(t) for t in parts.test))  # final per-client evals
    evals = sum(r % cfg.eval_every == 0 or r == cfg.rounds for r in range(1, cfg.rounds + 1))
    before = 2 * evaluation  # as built (zero-shot) and with the method's modules added
    if cfg.method == "head":  # cached features: the encoder runs once; the head is free
        return 0.0, float(n_train + (0 if cfg.val_fraction else n_test) + evaluation)
    trained = cfg.rounds * cfg.local_epochs * cfg.sample * train.mean()
    if cfg.mode == "local":  # every client's own model on the evaluation set (at most)
        return trained, before + evals * cfg.clients * evaluation + own
    return trained, before + evals * evaluation + own


# the datasets of the CPU profiles: (training pool, test set, classes), for :func:`work`
SMALL_SIZES = {"digits": (1437, 360, 10), "fashion-mnist": (1440, 360, 10)}


def work(cfg: RunConfig) -> float:
    """A run's cost in forward-pass equivalents (:func:`images`, a trained image counted
    :func:`forwards_per_trained_image` times); 0 for a dataset of unknown size."""
    sizes = SIZES.get(cfg.dataset) or SMALL_SIZES.get(cfg.dataset)
    if sizes is None:
        return 0.0
    trained, forwarded = images(cfg, sizes)
    return trained * forwards_per_trained_image(cfg.method) + forwarded


def longest_first(cfgs: list[RunConfig]) -> list[RunConfig]:
    """``cfgs`` ordered by :func:`work`, most first (ties keep their order), so that a pool's
    last runs are short ones and no worker idles long at the end of a grid."""
    return sorted(cfgs, key=work, reverse=True)


def gpu_hours(cfg: RunConfig, img_s: float = ANCHOR_IMG_S, cached: bool = True) -> float:
    """Estimated hours of one GPU for one run at the anchored FLOP rate.

    ``cached=False``: head-only as if the frozen encoder ran on every batch of every round.
    """
    uncached_head = cfg.method == "head" and not cached
    trained, forwarded = images(cfg.replace(method="bias") if uncached_head else cfg)
    per_train = 1 if uncached_head else forwards_per_trained_image(cfg.method)
    flops = FWD_GFLOPS[cfg.model] * (per_train * trained + forwarded)  # GFLOPs
    rate = img_s * 3 * FWD_GFLOPS["vit-b16"]  # GFLOP/s of the anchor
    return flops / rate / 3600
