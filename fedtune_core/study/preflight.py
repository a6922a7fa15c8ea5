"""What a grid checks before it starts any run: the data fit every partition, the weights exist.

A config is validated on construction (:class:`~fedtune_core.config.RunConfig`) without
looking at data or weights. Before a grid spends hours, the rest of what can be known is
checked once: each dataset is loaded once and every run's partition is drawn on it (every
client must get a training and a test sample; the partition is deterministic and cheap),
and each backbone's weights are loaded once (a checkpoint file must fit, hub weights must be
reachable or cached). The first problem stops the grid with one line, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedtune_core.config import RunConfig


def check(cfgs: Iterable[RunConfig], data_root: str | None = None,
          building: Iterable[tuple[str, str]] = ()) -> None:
    """Raise ConfigError on the first run of ``cfgs`` that cannot start.

    ``building``: the ``(model, recipe)`` checkpoints the grid pre-trains alongside its
    runs. The weights of the runs that use them are what that pre-training makes, so they
    are not loaded here (that would build them first, one at a time, in this process).
    """
    from fedtune_core import recipes

    cfgs, building = list(cfgs), set(building)
    check_partitions(cfgs, data_root)
    check_weights({(c.model, c.weights) for c in cfgs
                   if not building & set(recipes.needed([(c.model, c.weights)]))})


def check_partitions(cfgs: Iterable[RunConfig], data_root: str | None = None) -> None:
    """Draw every run's partition on its dataset (each dataset loaded once)."""
    from fedtune_core.fl import data, partition

    labels: dict[str, tuple] = {}
    seen = set()
    for cfg in cfgs:
        key = (cfg.dataset, cfg.partition, cfg.clients, cfg.seed, cfg.local_test_fraction)
        if key in seen:
            continue
        seen.add(key)
        if cfg.dataset not in labels:
            dataset = data.load(cfg.dataset, data_root)
            labels[cfg.dataset] = (dataset.train.labels.numpy(), len(dataset.class_names))
        pool, classes = labels[cfg.dataset]
        partition.split_clients(pool, cfg.partition, cfg.clients, cfg.seed,
                                cfg.local_test_fraction, num_classes=classes)


def check_weights(pairs: Iterable[tuple[str, str]]) -> None:
    """Build each (model, weights) once with its weights: files must fit, the hub must answer.

    The weights then sit in the hub's cache, so the runs do not each download them; a
    pre-training recipe's checkpoint is built if it is missing (the grid builds them all
    first, in parallel: :func:`fedtune_core.proxy.pretrain.ensure_all`).
    """
    from fedtune_core.fl import models
    from fedtune_core.proxy import pretrain

    for model, weights in sorted(pairs):
        if models.resolve_weights(model, weights)[0] != "none":
            pretrain.build(model, ["a", "b"], weights, text_head=False)
