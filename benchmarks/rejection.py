"""Seconds until the ``fedtune`` command answers bad arguments (a fresh process each time).

    .venv/bin/python benchmarks/rejection.py [repeats]

Prints the median and worst wall time per command line. The arguments are checked before
torch and the model libraries are imported, so each answer should take well under a second.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

FEDTUNE = str(Path(sys.executable).with_name("fedtune"))
CASES = [
    ["run", "--model", "nope"],
    ["run", "--lr", "nan"],
    ["run", "--method", "adapter", "--adapter-scale", "nan"],
    ["run", "--seed", str(2**64)],
    ["run", "--dataset", "imagefolder:"],
    ["run", "--results", "/proc/fedtune-results"],
    ["params", "--model", "vit-tiny", "--classes", "100000000000"],
    ["grid", "--jobs", "-3"],
    ["grid", "--profile", "paper", "--dry-run", "--results", "/nonexistent"],
    ["run", "--device", "tpu"],
    ["run", "--device", "cuda:7"],
    ["run", "--results", "x" * 300],
]


def seconds(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([FEDTUNE, *argv], capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{'command':<64}{'exit':>5}{'median s':>10}{'worst s':>9}")
    for argv in CASES:
        runs = [seconds(argv) for _ in range(repeats)]
        times = [t for t, _ in runs]
        print(f"{' '.join(['fedtune', *argv])[:63]:<64}{runs[0][1]:>5}"
              f"{statistics.median(times):>10.2f}{max(times):>9.2f}")


if __name__ == "__main__":
    main()
