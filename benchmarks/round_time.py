"""Seconds per FedAvg round, bytes per client and peak memory, for every tuning method.

    .venv/bin/python benchmarks/round_time.py                      # tiny models, digits, CPU
    .venv/bin/python benchmarks/round_time.py --model vit-b16 --dataset synthetic --device cuda

One backbone is shared by all clients, so memory stays at one model plus a few copies of
the trainable state whatever the number of clients; this prints the figures to check it.
"""

import argparse
import resource
import time

import torch

from fedtune_core import tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin, training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--sample", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    training.set_cpu_threads()
    print(f"{args.model} on {args.dataset}, {args.sample} of {args.clients} clients per round, "
          f"device {training.pick_device(args.device)}")
    print(f"{'method':<10}{'s/round':>10}{'MB/client/round':>17}{'trainable':>12}{'peak MB':>10}")
    for method in tuning.METHODS:
        cfg = RunConfig(model=args.model, weights="none", method=method, dataset=args.dataset,
                        partition="iid", clients=args.clients, sample=args.sample,
                        rounds=args.rounds)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = builtin.execute(cfg, device=args.device)
        wall = time.perf_counter() - start
        per_round = sum(r["seconds"] for r in out.rows[1:]) / args.rounds
        peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(f"{method:<10}{per_round:>10.3f}{out.state_bytes / 1e6:>17.3f}"
              f"{out.trainable:>12,}{peak:>10.0f}   (whole run {wall:.1f}s)")


if __name__ == "__main__":
    main()
