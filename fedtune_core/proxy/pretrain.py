"""Offline pre-training of the tiny backbones: builds the checkpoints that recipes name.

A recipe (:mod:`fedtune_core.recipes`, data) says how a tiny backbone is pre-trained on
the glyph corpus (:mod:`fedtune_core.proxy.glyphs`): ViT supervised, CLIP contrastive
(:mod:`fedtune_core.proxy.objectives`), the same images and image passes for both. The
checkpoint, ``<cache>/pretrained/<model>-<recipe>-<hash>.pt``, holds what the model's
loader expects of a user's checkpoint file (timm's state dict with its own 47-way head;
the full open_clip model) and loads through that same path; a JSON sidecar holds the
recipe, the pre-training metrics, the proxy's quality on digits (:mod:`fedtune_core.proxy.probe`)
and the file's sha256. A checkpoint is built once (under a lock, written atomically),
checked against its sha256 whenever it is used, and rebuilt if it does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fedtune_core import files, recipes
from fedtune_core.errors import check_choice
from fedtune_core.fl import models
from fedtune_core.lock import Lock
from fedtune_core.proxy import glyphs, objectives, probe
from fedtune_core.recipes import Recipe


def weights_file(model: str, weights: str, *, progress: bool = False) -> str | None:
    """The checkpoint file that recipe weights (the tiny models' ``auto``) name, built on
    first use (a progress bar if ``progress``); None for any other weights value, which
    :func:`models.build` takes as it is. What a run hands the federated core, so that
    ``fl/`` loads a recipe's checkpoint through the same path as a user's file.

    Raises:
        ConfigError: a ``<recipe>@<hash>`` whose recipe has changed since.
    """
    kind, name = models.resolve_weights(model, weights)
    if kind != "recipe":
        return None
    recipes.check_run_weights(model, weights)
    return ensure(model, name, progress=progress)["path"]


def build(model: str, class_names: Sequence[str], weights: str = "auto", *,
          quick_gelu: bool | None = None, text_head: bool = True,
          progress: bool = False) -> models.Classifier:
    """:func:`models.build` that also takes recipe weights (:func:`weights_file`)."""
    path = weights_file(model, weights, progress=progress)
    return models.build(model, class_names, path or weights, text_head=text_head,
                        quick_gelu=quick_gelu)


def ensure(model: str, name: str, recipe: Recipe | None = None, *, force: bool = False,
           progress: bool = False, position: int = 0) -> dict:
    """The checkpoint's sidecar, building the checkpoint first if it is missing or broken.

    Args:
        model: a backbone with pre-training recipes (``clip-tiny``, ``vit-tiny``).
        name: a recipe name (the checkpoint's name; ``recipe`` overrides its settings).
        recipe: the settings; default ``RECIPES[name]``.
        force: build again even if a checkpoint exists.
        progress: a tqdm bar over the steps on stderr (``position`` for parallel bars).
    """
    check_choice(f"pre-training recipe for {model}", name, models.BACKBONES[model].recipes)
    recipe = recipe or recipes.named(name)
    path = recipes.checkpoint_path(model, name, recipe)
    files.clean_temps(path.parent)  # what a killed builder left (only dead writers' files)
    if not force and (meta := recipes.cached(model, name, recipe)):
        return meta
    with Lock(path.with_suffix(".lock")):
        if not force and (meta := recipes.cached(model, name, recipe)):
            return meta  # another process built it while we waited
        with glyphs.pinned_threads():  # the same bytes whatever the machine's threads
            return _build(model, name, recipe, path, progress, position)


def ensure_all(pairs: Iterable[tuple[str, str]], jobs: int = 1, *, force: bool = False,
               progress: bool = False) -> list[dict]:
    """:func:`ensure` every ``(model, recipe name)``, ``jobs`` processes at a time.

    The corpora are generated once, first, and shared through the cache (memory-mapped).
    """
    pairs = list(dict.fromkeys(pairs))
    todo = [p for p in pairs if force or recipes.cached(*p) is None]
    for corpus in dict.fromkeys(recipes.named(name).corpus for _, name in todo):
        glyphs.load(corpus, progress)
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(jobs, len(todo)), initializer=_one_thread) as pool:
            futures = [pool.submit(ensure, m, n, force=force, progress=progress, position=i)
                       for i, (m, n) in enumerate(todo)]
            for future in futures:
                future.result()
    else:
        for m, n in todo:
            ensure(m, n, force=force, progress=progress)
    return [ensure(m, n) for m, n in pairs]


def make_corpus(corpus: recipes.CorpusConfig, progress: bool = False) -> str:
    """Generate the glyph corpus into the cache unless it is there intact; its hash (the
    arrays stay on disk, memory-mapped by whoever trains on them)."""
    glyphs.load(corpus, progress)
    return corpus.hash


def longest_first(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(model, recipe)`` checkpoints, the longest to build first: more steps first, and at
    equal steps CLIP (its text tower too) before ViT, so that the last to end is short."""
    def cost(pair: tuple[str, str]) -> tuple[int, bool]:
        model, name = pair
        return recipes.named(name).steps, models.BACKBONES[model].family == "open_clip"

    return sorted(pairs, key=cost, reverse=True)


def _one_thread() -> None:
    torch.set_num_threads(glyphs.THREADS)


def _build(model: str, name: str, recipe: Recipe, path: Path, progress: bool,
           position: int) -> dict:
    t0 = time.perf_counter()
    images, labels = glyphs.load(recipe.corpus, progress)
    objective, metrics = train(model, recipe, images, labels, progress, position)
    buffer = io.BytesIO()  # not the file itself: torch would name the archive after it
    torch.save(objective.state_dict(), buffer)
    with files.staged(path, len(buffer.getvalue())) as tmp:
        tmp.write_bytes(buffer.getvalue())  # the same weights are the same bytes
        quality = probe.proxy_quality(model, tmp)
    meta = {"model": model, "recipe": name, "hash": recipes.recipe_hash(model, recipe),
            "recipe_config": recipe.to_dict(), "version": recipes.VERSION, "steps": recipe.steps,
            "image_passes": recipe.steps * recipe.batch_size, **metrics, **quality,
            "seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    with files.staged(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return meta


def train(model: str, recipe: Recipe, images: np.ndarray, labels: np.ndarray,
          progress: bool = False, position: int = 0) -> tuple[objectives.Objective, dict]:
    """Pre-train ``model`` on the corpus; deterministic for the recipe's seed on CPU,
    whatever the machine's thread count (it runs with :data:`glyphs.THREADS`).

    The last ``recipe.holdout`` images are never trained on; they give the pre-training
    accuracy (47-way: the ViT's own head, CLIP's zero-shot with the class captions).

    Returns:
        The objective (model inside) and metrics: ``final_loss``, ``train_acc`` (mean over
        the last 100 steps), ``pretrain_acc`` (held out).
    """
    with glyphs.pinned_threads():
        return _train(model, recipe, images, labels, progress, position)


def _train(model: str, recipe: Recipe, images: np.ndarray, labels: np.ndarray,
           progress: bool, position: int) -> tuple[objectives.Objective, dict]:
    from tqdm import tqdm

    spec = models.BACKBONES[model]
    torch.manual_seed(recipe.seed)
    objective = objectives.OBJECTIVES[spec.family](spec, recipe)
    opt = torch.optim.AdamW(_param_groups(objective.net, recipe.weight_decay), lr=recipe.lr,
                            foreach=True)  # the for-loop step's bytes, in fewer ops
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, recipe))
    rng = np.random.default_rng([recipe.seed, 1])
    batches = _batches(len(labels) - recipe.holdout, recipe.batch_size, rng)
    losses, accs = [], []
    objective.net.train()
    bar = tqdm(range(recipe.steps), desc=f"pretrain {model} {recipe.steps} steps",
               disable=not progress, position=position, leave=False, mininterval=1.0)
    for _ in bar:
        idx = next(batches)
        x = objective.preprocess(torch.from_numpy(images[idx]))
        loss, acc = objective.loss(x, torch.from_numpy(labels[idx]), rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        objective.after_step()
        losses.append(loss.item())
        accs.append(acc.item())
    held = slice(len(labels) - recipe.holdout, len(labels))
    return objective, {"final_loss": float(np.mean(losses[-100:])),
                       "train_acc": float(np.mean(accs[-100:])),
                       "pretrain_acc": _accuracy(objective, images[held], labels[held])}


def _schedule(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, done)))


def _param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in net.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]


def _batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches over ``range(n)``: epochs of random permutations, sorted batches."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield np.sort(order[start:start + batch])


@torch.no_grad()
def _accuracy(objective: objectives.Objective, images: np.ndarray, labels: np.ndarray) -> float:
    objective.net.eval()
    correct = 0
    for start in range(0, len(labels), 500):
        x = objective.preprocess(torch.tensor(images[start:start + 500]))
        pred = objective.scores(x).argmax(1).numpy()
        correct += int((pred == labels[start:start + 500]).sum())
    return correct / max(1, len(labels))


def summary(meta: dict, status: str = "") -> str:
    """One line about a checkpoint: name, hash, steps, accuracies, time, path."""
    def fmt(key: str) -> str:
        return "-" if meta.get(key) is None else f"{meta[key]:.3f}"

    return (f"{meta['model']:<10} {meta['recipe']:<14} {meta['hash']}  {status:<7}"
            f"steps {meta['steps']:>5}  pretrain acc {fmt('pretrain_acc')}  probe acc "
            f"{fmt('probe_acc')}  zero-shot acc {fmt('zeroshot_acc')}  "
            f"{meta['seconds']:>5.0f} s  {meta['path']}")
