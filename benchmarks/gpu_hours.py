"""An estimate of the GPU-hours a profile needs, per experiment and backbone.

    .venv/bin/python benchmarks/gpu_hours.py                 # the paper profile, H100 anchor
    .venv/bin/python benchmarks/gpu_hours.py --img-s 2000    # another measured anchor

Counts the images every run processes from its config (the clients' real split sizes for
CIFAR's 50,000 training and 10,000 test images, rounds, sampled clients, local epochs,
evaluations), turns them into FLOPs with the FLOPs per 224 image forward of each backbone,
and divides by one anchored rate: ViT-B/16 training at 1,459 images/s per H100 (a public
figure), i.e. 1,459 x 3 x 35.2 GFLOP/s. Assumptions, stated so they can be changed:
training an image costs 3 forwards with full fine-tuning and 2 with the lightweight methods
(gradients still flow back through every block, weight gradients of frozen layers are
skipped); head-only runs the encoder once over the training pool and the test set (cached
features) and the head costs nothing; every backbone reaches the anchor's FLOP rate. It is
an estimate, not a measurement: nothing of the paper profile has run on a GPU yet. The
counting lives in :mod:`fedtune_core.study.cost`; ``fedtune grid --rehearse`` multiplies the same
counts by measured seconds.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from fedtune_core.study.cost import ANCHOR_IMG_S, FWD_GFLOPS, gpu_hours, images
from fedtune_core.study.grid import load_profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="paper")
    p.add_argument("--img-s", type=float, default=ANCHOR_IMG_S,
                   help="ViT-B/16 training images/s of one GPU (default: 1,459, an H100)")
    args = p.parse_args()
    profile = load_profile(args.profile)
    rate = args.img_s * 3 * FWD_GFLOPS["vit-b16"] / 1e3
    print(f"Estimated GPU-hours, profile {profile.name}, anchor {args.img_s:,.0f} ViT-B/16 "
          f"training images/s per GPU = {rate:,.0f} TFLOP/s")
    print(f"{'experiment':<16}{'backbone':<14}{'runs':>6}{'M img trained':>15}"
          f"{'M img forward':>15}{'GPU-hours':>11}")
    groups = {name: [p.cfg for p in profile.planned(name)] for name in profile.experiments}
    groups["lr sweeps"] = profile.sweeps()
    groups["all (unique)"] = [p.cfg for p in profile.planned()] + profile.sweeps()
    for name, cfgs in groups.items():
        table: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
        for cfg in cfgs:
            row, (trained, forwarded) = table[cfg.model], images(cfg)
            row[0] += 1
            row[1] += trained / 1e6
            row[2] += forwarded / 1e6
            row[3] += gpu_hours(cfg, args.img_s)
        for model, (runs, trained, forwarded, hours) in sorted(table.items()):
            print(f"{name:<16}{model:<14}{runs:>6}{trained:>15.1f}{forwarded:>15.1f}"
                  f"{hours:>11.1f}")
        total = sum(r[3] for r in table.values())
        print(f"{name:<16}{'total':<14}{sum(r[0] for r in table.values()):>6}"
              f"{'':>30}{total:>11.1f}")
    heads = [c for c in groups["all (unique)"] if c.method == "head"]
    saved = sum(gpu_hours(c, args.img_s, cached=False) - gpu_hours(c, args.img_s) for c in heads)
    print(f"Head-only on cached features saves about {saved:.1f} GPU-hours over its "
          f"{len(heads)} runs (vs the encoder on every batch of every round).")


if __name__ == "__main__":
    main()
