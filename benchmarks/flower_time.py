"""Wall time of one run through Flower's simulation engine against the built-in loop's.

    .venv/bin/python benchmarks/flower_time.py                    # tiny ViT, bias, digits, CPU
    .venv/bin/python benchmarks/flower_time.py --method lora --rounds 5 --clients 10 --sample 5

The same config runs once through each engine (``engine = builtin``, then ``flower``); it
prints both wall times, their ratio, and whether the per-round test accuracy agrees. One
run each, so a figure, not a distribution: Flower's share is start-up (a local Ray
instance, one actor process per CPU, each importing torch and building the model once)
plus its message passing per round. Needs the ``flower`` extra.
"""

import argparse
import os
import platform
import time
from datetime import UTC, datetime

from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin, flower_app, training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("--method", default="bias")
    p.add_argument("--weights", default="none")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--sample", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    training.set_cpu_threads()
    cfg = RunConfig(model=args.model, method=args.method, weights=args.weights,
                    dataset="digits", partition="iid", clients=args.clients,
                    sample=args.sample, rounds=args.rounds, batch_size=64)
    seconds, rows = {}, {}
    for engine, execute in (("builtin", builtin.execute), ("flower", flower_app.execute)):
        t0 = time.perf_counter()
        rows[engine] = execute(cfg.replace(engine=engine), device="cpu").rows
        seconds[engine] = time.perf_counter() - t0
    same = all(abs(a["test_acc"] - b["test_acc"]) <= 1e-6
               for a, b in zip(rows["builtin"], rows["flower"], strict=True))
    load = os.getloadavg()[0]
    print(f"{args.model} {args.method} on digits, {args.sample} of {args.clients} clients, "
          f"{args.rounds} rounds, CPU ({os.cpu_count()} cores, load average {load:.1f}), "
          f"{platform.node()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"builtin loop      {seconds['builtin']:8.1f} s")
    print(f"flower simulation {seconds['flower']:8.1f} s")
    print(f"ratio flower / builtin: {seconds['flower'] / seconds['builtin']:.1f}x; "
          f"per-round test accuracy {'equal' if same else 'DIFFERS'} (1e-6)")


if __name__ == "__main__":
    main()
