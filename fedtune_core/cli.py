"""The ``fedtune`` command: run one configuration, count parameters, run a profile's grid.

Bad input exits with code 2 and one line on stderr naming the bad value and the valid
choices; nothing is written. Arguments are checked before torch and the model libraries are
imported, so such an answer takes well under a second. A run that fails for another reason
(including a run that diverges) is recorded as failed and exits with code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from fedtune_core.errors import ConfigError, check_int

MAX_CLASSES = 100_000  # fedtune params: ImageNet-21k has 21,843
RUN_FIELDS = ("model", "weights", "quick_gelu", "method", "dataset", "partition", "clients",
              "sample", "rounds", "local_epochs", "batch_size", "optimizer", "lr", "weight_decay",
              "local_test_fraction", "val_fraction", "mode", "eval_every", "seed", "engine")


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str):
        self.exit(2, f"fedtune: error: {message}\n")


def _method_flags() -> dict[str, tuple[str, str, dataclasses.Field]]:
    """``--<method>-<option>`` for every option of every registered method."""
    from fedtune_core import tuning

    flags = {}
    for name, method in tuning.METHODS.items():
        for f in dataclasses.fields(method.config):
            flags[f"{name}_{f.name}"] = (name, f.name, f)
    return flags


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from fedtune_core.config import RunConfig

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    types = {"clients": int, "sample": int, "rounds": int, "local_epochs": int, "batch_size": int,
             "eval_every": int, "seed": int, "lr": float, "weight_decay": float,
             "local_test_fraction": float, "val_fraction": float}
    types["quick_gelu"] = _auto_bool
    for name in RUN_FIELDS:
        shown = "auto" if defaults[name] is None and name == "quick_gelu" else defaults[name]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=types.get(name, str),
                       default=defaults[name], help=f"default: {shown}")
    group = p.add_argument_group("method options (only for the method they name)")
    for dest, (method, option, f) in _method_flags().items():
        group.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=type(f.default),
                           default=None, help=f"{method}: {option} (default {f.default})")


def _auto_bool(text: str) -> bool | None:
    """``auto`` -> None, ``true``/``false`` -> bool (for --quick-gelu)."""
    values = {"auto": None, "true": True, "false": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}; valid choices: auto, true, "
                                         "false")
    return values[text.lower()]


def _config_from(args: argparse.Namespace):
    from fedtune_core.config import RunConfig

    options = {}
    for dest, (method, option, _) in _method_flags().items():
        value = getattr(args, dest)
        if value is None:
            continue
        if method != args.method:
            raise ConfigError(f"option --{dest.replace('_', '-')} is for tuning method "
                              f"{method!r}, not {args.method!r}")
        options[option] = value
    return RunConfig(**{k: getattr(args, k) for k in RUN_FIELDS}, method_options=options)


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune_core.checks import check_results_folder

    cfg = _config_from(args)  # validated without torch: bad input answers at once
    check_results_folder(args.results)
    from fedtune_core.fl import training
    from fedtune_core.runs import claims, store

    training.set_cpu_threads()
    training.pick_device(args.device)
    kept = not args.force and store.kept(args.results, cfg, retry_failed=args.retry_failed,
                                           warn=False)
    record = claims.run(cfg, args.results, device=args.device, data_root=args.data_dir,
                         progress=not args.quiet, force=args.force,
                         retry_failed=args.retry_failed)
    print(store.record_path(args.results, cfg))
    if record["status"] != "ok":
        hint = " (recorded earlier: --retry-failed or --force runs it again)" if kept else ""
        print(f"fedtune: run failed: {record['error']}{hint}", file=sys.stderr)
        return 1
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from fedtune_core import specs
    from fedtune_core.errors import check_choice

    check_int("--classes", args.classes, 1, MAX_CLASSES)
    check_choice("model", args.model, specs.BACKBONES)
    import torch

    from fedtune_core import tuning
    from fedtune_core.fl import models

    rows = []
    for method in tuning.METHODS:
        with torch.device("meta"):  # shapes only: no weights are made (seconds, not minutes)
            model = models.build(args.model, [str(c) for c in range(args.classes)], "none",
                                 text_head=False)
            tuning.prepare(model, method)
        trainable, total = tuning.count_parameters(model)
        head = sum(p.numel() for p in model.head.parameters())
        rows.append({"method": method, "trainable": trainable, "trainable_without_head":
                     trainable - head, "total": total, "percent": 100.0 * trainable / total})
    if args.json:
        print(json.dumps({"model": args.model, "classes": args.classes, "methods": rows}, indent=1))
        return 0
    print(f"{args.model}, {args.classes} classes")
    print(f"{'method':<10}{'trainable':>14}{'without head':>14}{'total':>14}{'%':>9}")
    for r in rows:
        print(f"{r['method']:<10}{r['trainable']:>14,}{r['trainable_without_head']:>14,}"
              f"{r['total']:>14,}{r['percent']:>9.3f}")
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from fedtune_core.config import RunConfig

    RunConfig(model=args.model, weights=args.weights, dataset=args.dataset, method="head")
    from fedtune_core.fl import builtin
    from fedtune_core.proxy import pretrain

    path = pretrain.weights_file(args.model, args.weights, progress=True)
    acc = builtin.zero_shot(args.model, args.dataset, args.weights, args.device, args.data_dir,
                       weights_file=path)
    print(f"{args.model} on {args.dataset}: accuracy before training {acc:.4f}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedtune_core import recipes

    pairs = recipes.select(args.model, args.recipe)  # checked without torch
    if args.jobs is not None:
        check_int("--jobs", args.jobs, 1, 64)
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, 4))
    from fedtune_core.proxy import pretrain

    before = {p: recipes.cached(*p) is not None and not args.force for p in pairs}
    metas = pretrain.ensure_all(pairs, jobs, force=args.force, progress=not args.quiet)
    for pair, meta in zip(pairs, metas, strict=True):
        print(pretrain.summary(meta, "cached" if before[pair] else "built"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run one configuration and print its record's path")
    _add_run_args(run)
    run.add_argument("--results", default="results/adhoc", help="results folder (records in runs/)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    run.add_argument("--data-dir", default=None, help="dataset folder ($FEDTUNE_DATA_DIR, ./data)")
    run.add_argument("--force", action="store_true", help="run again even if a record exists")
    run.add_argument("--retry-failed", action="store_true",
                     help="run again a run whose kept record says it diverged")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    params = sub.add_parser("params", help="trainable / total parameters of every method")
    params.add_argument("--model", required=True)
    params.add_argument("--classes", type=int, required=True)
    params.add_argument("--json", action="store_true", help="machine-readable output")
    params.set_defaults(func=cmd_params)

    zs = sub.add_parser("zeroshot", help="accuracy before any training (CLIP: zero-shot)")
    zs.add_argument("--model", required=True)
    zs.add_argument("--dataset", default="digits")
    zs.add_argument("--weights", default="auto")
    zs.add_argument("--device", default="auto")
    zs.add_argument("--data-dir", default=None)
    zs.set_defaults(func=cmd_zeroshot)

    pre = sub.add_parser("pretrain", help="build (or report cached) pre-trained tiny checkpoints")
    pre.add_argument("--model", default="all", help="clip-tiny, vit-tiny or all (default)")
    pre.add_argument("--recipe", default="all", help="glyphs-weak, glyphs-strong or all (default)")
    pre.add_argument("--jobs", type=int, default=None,
                     help="checkpoints built in parallel processes (default: CPU cores, max 4)")
    pre.add_argument("--force", action="store_true", help="build again even if cached")
    pre.add_argument("--quiet", action="store_true", help="no progress bars")
    pre.set_defaults(func=cmd_pretrain)

    from fedtune_core.study import grid

    grid.add_parser(sub)
    sub.choices["grid"].set_defaults(func=cmd_grid)
    return parser


def cmd_grid(args: argparse.Namespace) -> int:
    """``fedtune grid``; with ``--rehearse``, the profile's rehearsal (rehearsal_report)."""
    from fedtune_core.study import grid

    if not args.rehearse:
        return grid.cmd_grid(args)
    from fedtune_core.study import rehearsal_report

    return rehearsal_report.cmd_rehearse(args, grid.load_profile(args.profile))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from fedtune_core.checks import check_device, check_environment

        check_environment()
        if getattr(args, "device", None) is not None:
            check_device(args.device, local=getattr(args, "backend", "pool") != "ray")
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except ConfigError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fedtune grid --dry-run | head -1`: stop quietly, like cat
        _mute_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _mute_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
