"""The federated core: how a run trains (data, partitions, models, weights, the loop)."""
