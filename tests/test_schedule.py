"""A grid starts its longest runs first, so the pool's workers finish together."""

from fedtune_core.config import RunConfig
from fedtune_core.study import cost

BASE = dict(model="vit-tiny", weights="none", dataset="digits", clients=10, sample=5,
            rounds=10, batch_size=32)


def test_runs_go_longest_first_and_ties_keep_their_order():
    head, bias, full = (RunConfig(**BASE, method=m) for m in ("head", "bias", "full"))
    local = RunConfig(**BASE, method="bias", mode="local")
    sweep = RunConfig(**BASE | {"rounds": 5}, method="full", val_fraction=0.2)
    twin = bias.replace(seed=1)
    order = cost.longest_first([head, sweep, bias, twin, local, full])
    assert order == [local, full, bias, twin, sweep, head]
    assert cost.work(local) > cost.work(bias) > cost.work(head) > 0


def test_a_dataset_of_unknown_size_keeps_its_place():
    odd = RunConfig(**BASE | {"dataset": "synthetic"}, method="full")
    bias = RunConfig(**BASE, method="bias")
    assert cost.work(odd) == 0
    assert cost.longest_first([odd, bias]) == [bias, odd]
