"""Seconds per step with 1 vs N intra-op CPU threads: tiny training step, ViT-B/16 forward.

    .venv/bin/python benchmarks/threads.py

Prints a table; fedtune uses one thread per run process on CPU (see fl.set_cpu_threads).
"""

import os
import time

import torch

from fedtune_core.fl import models


def seconds(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    names = [str(i) for i in range(10)]
    tiny = models.build("vit-tiny", names, "none")
    tiny_x = torch.randn(32, 3, 32, 32)
    big = models.build("vit-b16", names, "none")
    big_x = torch.randn(8, 3, 224, 224)
    print(f"{'threads':>8}{'tiny train step (ms)':>24}{'ViT-B/16 fwd, batch 8 (s)':>28}")
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        step = seconds(lambda: tiny(tiny_x).sum().backward(), 50)
        with torch.no_grad():
            fwd = seconds(lambda: big(big_x), 3)
        print(f"{threads:>8}{step * 1e3:>24.2f}{fwd:>28.2f}")


if __name__ == "__main__":
    main()
