"""What each tuning method costs relative to full fine-tuning, side by side, in one run.

    .venv/bin/python benchmarks/ratios.py              # CPU: batch 4, a few minutes
    .venv/bin/python benchmarks/ratios.py --quick      # CPU: one timed step, ViT-B/16 only
    .venv/bin/python benchmarks/ratios.py --device cuda --batch 32   # GPU: bf16, images/s, MFU

Prints four tables:
1. seconds per training step of every method on vit-b16 and clip-vit-b32 at 224x224
   (random weights, synthetic images, the same batch) and its ratio to full fine-tuning,
   with the peak memory of a process that runs it (CPU: max RSS; CUDA: max allocated), each
   method in its own process; on CUDA also images/s and the model FLOPs utilisation (MFU)
   of full fine-tuning from the FLOPs per image below;
2. head-only seconds per FedAvg round on cached features vs through the encoder
   (clip-vit-b32 at 224), and the one-off cost of encoding;
3. grid throughput (runs/min) of the pool and the Ray backend on the smoke profile, and
   whether their metrics agree.
Training steps run through fedtune's own Trainer (bf16 autocast on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedtune_core import tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import data, features, fedavg, models, training

FWD_GFLOPS = {"vit-b16": 35.2, "clip-vit-b32": 8.8, "vit-b32": 8.7}  # per 224 image forward
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, per GPU
VARIANTS = {"full": ("full", {}), "head": ("head", {}), "bias": ("bias", {}),
            "prompt": ("prompt", {}), "prompt-deep": ("prompt", {"depth": "deep"}),
            "adapter": ("adapter", {}), "lora": ("lora", {})}
CLASSES = [f"class {i}" for i in range(100)]


def _images(n: int, size: int, device: torch.device, seed: int = 0) -> data.Split:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return data.Split(images, torch.randint(0, len(CLASSES), (n,), generator=gen)).to(device)


def _trainer(model_name: str, variant: str, batch: int, device: torch.device) -> training.Trainer:
    method, options = VARIANTS[variant]
    cfg = RunConfig(model=model_name, weights="none", method=method, method_options=options,
                    dataset="synthetic", batch_size=batch)
    model = models.build(model_name, CLASSES, "none", text_head=False)
    return training.Trainer(model, tuning.prepare(model, method, options), cfg, device)


def step_child(model_name: str, variant: str, batch: int, steps: int, device: str) -> dict:
    """In a process of its own: seconds per training step and the process's peak memory."""
    dev = training.pick_device(device)
    trainer = _trainer(model_name, variant, batch, dev)
    split = _images(batch * (steps + 1), trainer.model.input_size, dev)
    batches = [split.subset(np.arange(i * batch, (i + 1) * batch)) for i in range(steps + 1)]
    trainer.fit(batches[0], 1, (0,))  # warm-up: allocations, autotuning
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, one in enumerate(batches[1:], 1):  # one step each; fit ends with .item(): synced
        start = time.perf_counter()
        trainer.fit(one, 1, (i,))
        times.append(time.perf_counter() - start)
    per_step = min(times)  # the least disturbed by other processes
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": per_step, "peak_mb": peak, "trainable": len(trainer.params)}


def step_table(models_: list[str], batch: int, steps: int, device: str) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    mem = "peak MB (CUDA allocated)" if gpu else "peak MB (process RSS)"
    print(f"\n1. Seconds per training step, batch {batch} at 224x224, random weights "
          f"({gpu or 'CPU, one thread'}; fastest of {steps} steps after one warm-up)")
    print(f"{'model':<14}{'method':<13}{'s/step':>9}{'x full':>8}{mem:>26}{'img/s':>9}{'MFU':>7}")
    for name in models_:
        full = None
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", name, variant, "--batch", str(batch),
                   "--steps", str(steps), "--device", device]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                            text=True).stdout.splitlines()[-1])
            full = full or out["seconds"]
            ips = batch / out["seconds"]
            mfu = (f"{ips * 3 * FWD_GFLOPS[name] / (peak * 1e3):>7.1%}"
                   if peak and variant == "full" else f"{'':>7}")
            print(f"{name:<14}{variant:<13}{out['seconds']:>9.3f}{out['seconds'] / full:>8.2f}"
                  f"{out['peak_mb']:>26.0f}{ips:>9.1f}{mfu}".rstrip(), flush=True)


def cached_round(model_name: str, clients: int, per_client: int, batch: int,
                 device: str) -> None:
    """One FedAvg round of head-only tuning, on images through the encoder vs on features."""
    dev = training.pick_device(device)
    times = {}
    for cached in (False, True):
        trainer = _trainer(model_name, "head", batch, dev)
        trainer.cfg = trainer.cfg.replace(clients=clients, sample=clients, rounds=2)
        train = _images(clients * per_client, trainer.model.input_size, dev, seed=1)
        test = _images(per_client, trainer.model.input_size, dev, seed=2)
        start = time.perf_counter()
        if cached:
            train, test = features.encode(trainer, train, test)
            trainer = features.HeadView(trainer)
        encode = time.perf_counter() - start
        chunks = np.array_split(np.arange(len(train)), clients)
        pool = [training.Client(train.subset(c), test) for c in chunks]
        rows, _ = fedavg.run_fl(trainer.cfg, trainer, pool, test, progress=False)
        times[cached] = (np.mean([r["seconds"] for r in rows]), encode)
    (slow, _), (fast, encode) = times[False], times[True]
    print(f"\n2. Head-only, one FedAvg round on {model_name} at 224: {clients} clients x "
          f"{per_client} images, batch {batch}, evaluation on {per_client} test images")
    print(f"{'uncached s/round':>18}{'cached s/round':>16}{'uncached / cached':>19}"
          f"{'one-off encoding s':>20}")
    print(f"{slow:>18.3f}{fast:>16.5f}{slow / fast:>19.0f}{encode:>20.2f}", flush=True)


def grid_throughput(jobs: int) -> None:
    """The smoke profile on each backend from scratch (Ray: including starting it)."""
    from fedtune_core.study.grid import load_profile

    profile = load_profile("smoke")
    runs = len(profile.planned()) + len(profile.sweeps())  # learning-rate sweeps included
    fedtune = str(Path(sys.executable).with_name("fedtune"))
    print(f"\n3. Grid throughput, smoke profile ({runs} runs of tiny models), {jobs} at a time")
    print(f"{'backend':<10}{'wall s':>8}{'runs/min':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("pool", "ray"):
            cmd = [fedtune, "grid", "--profile", "smoke", "--results", f"{tmp}/{backend}",
                   "--quiet", "--jobs", str(jobs), "--backend", backend, "--device", "cpu"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - start
            print(f"{backend:<10}{wall:>8.1f}{runs / wall * 60:>10.1f}", flush=True)
        same = _same_metrics(Path(tmp, "pool", "runs"), Path(tmp, "ray", "runs"))
    print(f"identical metrics in every record: {'yes' if same else 'NO'}")


def _same_metrics(a: Path, b: Path) -> bool:
    """Every record of ``a`` has the same final metrics and rounds (but timings) in ``b``."""
    def metrics(path: Path) -> tuple:
        rec = json.loads(path.read_text())
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in rec["rounds"]]
        return rec["status"], rec["final"], rows

    paths = sorted(a.glob("*.json"))
    return bool(paths) and all(metrics(p) == metrics(b / p.name) for p in paths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps, the fastest counts (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="ViT-B/16 only, one timed step")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    training.set_cpu_threads()
    dev = training.pick_device(args.device)
    batch = args.batch or (32 if dev.type == "cuda" else 4)
    steps = args.steps or (1 if args.quick else 3)
    if args.child:
        print(json.dumps(step_child(*args.child, batch, steps, str(dev))))
        return
    print(f"fedtune benchmarks/ratios.py on {dev}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    step_table(["vit-b16"] if args.quick else ["vit-b16", "clip-vit-b32"], batch, steps,
               str(dev))
    cached_round("clip-vit-b32", 2, 8 if args.quick else 16, batch, str(dev))
    grid_throughput(2)


if __name__ == "__main__":
    main()
