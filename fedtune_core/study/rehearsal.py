"""A dress rehearsal of a profile: every run shape once, tiny, through the real code path.

``fedtune grid --profile P --rehearse`` turns profile ``P`` into a rehearsal profile
(:func:`transform`), written as ``<results>/<P>-rehearsal/<P>-rehearsal.toml`` so that the
notebooks load it like any profile, and runs it with the ordinary grid into that folder
only. Every distinct shape of ``P`` (model x method and options x mode x partition kind x
dataset, learning-rate sweeps included) becomes one run of it: the real architecture at
its real input size, two clients, one round, one seed, the profile's weights where this
machine has them (else random init, said in one line), the profile's dataset through its
real loader (a stand-in in its own format where the files are absent:
:mod:`fedtune_core.fl.standin`), each training call capped at a few steps and each
evaluation at a few samples (:mod:`fedtune_core.fl.limits`). Each record keeps its seconds
per step and peak memory; :mod:`fedtune_core.study.rehearsal_report` turns them into the shape
table and the projected cost of the whole profile.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import partition
from fedtune_core.study.profile import Profile, load_profile

SUFFIX = "-rehearsal"
CLIENTS = 2  # a couple of clients, both sampled
TRAIN_STEPS = 2  # per training call: the first is the warm-up, the rest are timed
EVAL_SAMPLES = 2  # per evaluation
CPU_BATCH = 2  # the default batch size of a rehearsal on the CPU (on a GPU: the profile's)
FIXED = {"clients": CLIENTS, "sample": CLIENTS, "rounds": 1}
Available = Callable[[str, str], bool]  # (model, weights) -> can this machine load them?


def folder_for(profile: Profile, results: str | os.PathLike | None) -> Path:
    """``results`` (its name must end in ``-rehearsal``) or ``results/<profile>-rehearsal``.

    Raises:
        ConfigError: a folder whose name does not end in ``-rehearsal`` (rehearsal records
            never mix with real ones).
    """
    folder = Path(results) if results else Path("results") / f"{profile.name}{SUFFIX}"
    if not folder.name.endswith(SUFFIX) or folder.name == SUFFIX:
        raise ConfigError(f"--results {str(results)!r} for a rehearsal: its folder name must "
                          f"end in {SUFFIX!r} (e.g. results/{profile.name}{SUFFIX}), so that "
                          "rehearsal records never mix with real ones")
    return folder


def prepare(profile: Profile, folder: str | os.PathLike, data_root: str | None,
            batch_size: int, available: Available | None = None) -> Profile:
    """Write the rehearsal profile of ``profile`` and its stand-in data into ``folder``.

    Returns the rehearsal profile as loaded back from its file (what the notebooks load).
    """
    from fedtune_core.fl import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    available = available or weights_available
    missing: dict[tuple[str, str], bool] = {}

    def has(model: str, weights: str) -> bool:
        if (model, weights) not in missing:
            missing[model, weights] = not available(model, weights)
        return not missing[model, weights]

    raw = transform(profile, batch_size, has)
    if gone := sorted({m for (m, _), bad in missing.items() if bad}):
        print(f"rehearsal: no pre-trained weights here for {', '.join(gone)} (hub cache, "
              "$FEDTUNE_WEIGHTS_DIR): their runs start from random init", flush=True)
    datasets = {c.dataset for c in _configs(profile)}
    for name in sorted(datasets & {"cifar10", "cifar100"}):
        write_stand_in(name, folder / "data", data.data_dir(data_root),
                       _fewshot_k(profile, name), batch_size)
    path = folder / f"{folder.name}.toml"
    from fedtune_core.files import write_text

    write_text(path, to_toml(raw))
    return load_profile(path)


def transform(profile: Profile, batch_size: int, has: Available) -> dict[str, Any]:
    """The rehearsal profile of ``profile``, as the parsed TOML of a profile file.

    One seed; every block and the base with two clients (both sampled), one round and
    ``batch_size``; each partition kind reduced to one value (the smallest K of
    ``fewshot``, else the first one met, the base's first); each rate's candidates
    reduced to the first, one sweep round; weights this machine lacks (``has``) replaced
    by ``none``. The experiments, their blocks and the variants stay as they are.
    """
    kinds = _partition_values(profile)
    base = profile.base | FIXED | {"batch_size": batch_size}
    base["partition"] = kinds[partition.parse(base.get("partition", RunConfig.partition)).kind]
    lr = {m: {"select": [v[0]]} if isinstance(v, tuple) else v for m, v in profile.lr.items()}
    selection = {"val_fraction": profile.lr_selection.val_fraction, "rounds": 1}
    if profile.lr_selection.seed is not None:
        selection["seed"] = profile.lr_selection.seed
    raw: dict[str, Any] = {
        "description": f"**REHEARSAL** of profile `{profile.name}`: every run shape once, "
                       f"tiny (two clients, one round, {TRAIN_STEPS} training steps per "
                       f"client, batch {batch_size}, evaluations on {EVAL_SAMPLES} images), "
                       "to find what breaks before the real runs. Its numbers mean nothing.",
        "pretrained": profile.pretrained, "seeds": [profile.seeds[0]],
        "gpus_per_run": profile.gpus_per_run,
        "rehearsal": {"of": profile.name, "train_steps": TRAIN_STEPS,
                      "eval_samples": EVAL_SAMPLES, "batch_size": batch_size,
                      "data_dir": "data"},
        "base": base, "lr": lr, "lr_selection": selection, "variants": profile.variants}
    for name, blocks in profile.experiments.items():
        raw[name] = [b for block in blocks for b in _blocks(block, base, kinds, has)]
    return raw


def _partition_values(profile: Profile) -> dict[str, str]:
    """Partition kind -> the one value the rehearsal uses for it."""
    seen = [profile.base.get("partition", RunConfig.partition)]
    for blocks in profile.experiments.values():
        for block in blocks:
            value = block.get("partition", [])
            seen += value if isinstance(value, list) else [value]
    out: dict[str, str] = {}
    for value in seen:
        spec = partition.parse(value)
        if spec.kind not in out or (spec.kind == "fewshot"
                                    and spec.value < partition.parse(out[spec.kind]).value):
            out[spec.kind] = str(value)
    return out


def _blocks(block: dict[str, Any], base: dict[str, Any], kinds: dict[str, str],
            has: Available) -> list[dict[str, Any]]:
    """A block's rehearsal: one block per model (their weights may differ)."""
    out = {k: v for k, v in block.items() if k not in ("seed", *FIXED, "batch_size")}
    if "partition" in out:
        values = out["partition"] if isinstance(out["partition"], list) else [out["partition"]]
        out["partition"] = list(dict.fromkeys(kinds[partition.parse(v).kind] for v in values))
    models = _axis(out, base, "model", RunConfig.model)
    weights = _axis(out, base, "weights", RunConfig.weights)
    blocks = []
    for model in models:
        usable = list(dict.fromkeys(w if w == "none" or has(model, w) else "none"
                                    for w in weights))
        blocks.append(out | {"model": model, "weights": usable})
    return blocks


def _axis(block: dict[str, Any], base: dict[str, Any], key: str, default: Any) -> list:
    value = block.get(key, base.get(key, default))
    return value if isinstance(value, list) else [value]


def _configs(profile: Profile) -> list[RunConfig]:
    return [p.cfg for p in profile.planned()]


def _fewshot_k(profile: Profile, dataset: str) -> int:
    """K of the rehearsal's fewshot partition where ``dataset`` has one (else 0)."""
    value = _partition_values(profile).get("fewshot")
    used = any(c.dataset == dataset and partition.parse(c.partition).kind == "fewshot"
               for c in _configs(profile))
    return int(partition.parse(value).value) if value and used else 0


def weights_available(model: str, weights: str) -> bool:
    """Whether this machine can load ``weights`` for ``model`` (hub cache, file, recipe)."""
    from fedtune_core.fl import models
    from fedtune_core.proxy import pretrain

    kind, _ = models.resolve_weights(model, weights)
    if kind in ("none", "recipe"):  # a recipe's checkpoint is built here when missing
        return True
    try:
        pretrain.build(model, ["a", "b"], weights, text_head=False)
    except ConfigError:
        return False
    return True


def write_stand_in(dataset: str, root: Path, real_root: Path, fewshot_k: int,
                   batch_size: int) -> Path:
    """The dataset's stand-in under ``root``: a few of the real images where the real files
    are under ``real_root``, else generated ones. Enough for every rehearsal partition, and
    for full batches in every client's training steps (twice over: label skew is uneven),
    after its local test and validation shares (0.2 each in the paper)."""
    from fedtune_core.fl import data, standin

    pool = math.ceil(2 * CLIENTS * TRAIN_STEPS * batch_size / 0.64)
    per_class = max(CLIENTS * max(fewshot_k, 1), 2,
                    math.ceil(pool / len(standin.names(dataset))))
    folder = standin.LAYOUT[dataset][0]
    if (real_root / folder).is_dir():
        real = data.load(dataset, real_root)  # the real loader on the real files
        pool = [(s.images.permute(0, 2, 3, 1).numpy(), s.labels.numpy())
                for s in (real.train, real.test)]
        source = f"a few of the real images in {real_root / folder}"
    else:
        pool = [standin.generated(dataset, per_class + 1), standin.generated(dataset, 1, 1)]
        source = "generated (the real files are not on this machine)"
    train = standin.subset(*pool[0], per_class, extra=4)
    test = standin.subset(*pool[1], 1, classes=10)
    return standin.write_cifar(dataset, root, train, test, source)


def to_toml(raw: dict[str, Any]) -> str:
    """A profile's parsed TOML written back as TOML (scalars, tables, arrays of tables)."""
    lines = ["# Written by fedtune grid --rehearse: the rehearsal of a profile (do not edit)."]
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in raw.items() if isinstance(v, list) and v
              and all(isinstance(b, dict) for b in v)}
    lines += [f"{k} = {_value(v)}" for k, v in raw.items() if k not in tables | arrays]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{_key(k)} = {_value(v)}" for k, v in table.items())]
    for name, blocks in arrays.items():
        for block in blocks:
            lines += ["", f"[[{name}]]", *(f"{_key(k)} = {_value(v)}" for k, v in block.items())]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
