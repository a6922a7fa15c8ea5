"""Offline pre-training of the tiny backbones: the glyph corpus, recipes, cached checkpoints,
the loading path they share with user checkpoints, and how runs name them.

The recipes here are seconds long (a few thousand images, a few hundred small steps); the
conftest points $FEDTUNE_CACHE_DIR at a temporary folder.
"""

import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from fedtune_core import cli, recipes
from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import data, models
from fedtune_core.proxy import glyphs, pretrain, probe
from fedtune_core.runs import claims

MODELS = ["vit-tiny", "clip-tiny"]
# seconds long: 3,000 images, 40 steps of 32 (nothing much is learnt; enough to test the plumbing)
QUICK = dataclasses.replace(
    recipes.named("glyphs-weak"), corpus=glyphs.CorpusConfig(size=3000, seed=1),
    holdout=200, steps=40, batch_size=32, warmup=5)


@pytest.fixture
def quick_recipes(monkeypatch):
    """Both named recipes replaced by seconds-long ones (different from each other)."""
    monkeypatch.setitem(recipes.RECIPES, "glyphs-weak", QUICK)
    monkeypatch.setitem(recipes.RECIPES, "glyphs-strong", dataclasses.replace(QUICK, steps=41))


@pytest.fixture
def no_probe(monkeypatch):
    """Skip the digits probe of new checkpoints (tests of the cache, not of quality)."""
    monkeypatch.setattr(probe, "proxy_quality", lambda model, weights: {"probe_acc": 0.5})


@pytest.fixture(scope="module")
def built() -> dict[str, dict]:
    """The QUICK checkpoint of each tiny model, built once through the cache."""
    return {m: pretrain.ensure(m, "glyphs-weak", QUICK) for m in MODELS}


def _corpus() -> tuple[np.ndarray, np.ndarray]:
    return glyphs.load(QUICK.corpus)


# ---------------------------------------------------------------- the corpus


def test_corpus_is_deterministic_balanced_and_shaped_like_a_split():
    cfg = glyphs.CorpusConfig(size=470, seed=3)
    a, b = glyphs.generate(cfg), glyphs.generate(cfg)
    assert a.images.dtype == torch.uint8 and a.images.shape == (470, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels, minlength=47).tolist() == [10] * 47
    other = glyphs.generate(glyphs.CorpusConfig(size=470, seed=4))
    assert not torch.equal(a.images, other.images)
    assert cfg.hash != glyphs.CorpusConfig(size=470, seed=4).hash


def test_no_digits_image_is_in_the_corpus():
    images, _ = _corpus()
    digits = data.load("digits")
    pre = data.Preprocess(32, (0, 0, 0), (1 / 255,) * 3)  # the bicubic upsampling runs apply
    both = torch.cat([digits.train.images, digits.test.images])
    upsampled = pre(both).clamp(0, 255).round().to(torch.uint8).numpy()
    corpus = {img.tobytes() for img in images}
    assert not any(img.tobytes() in corpus for img in upsampled)


def test_the_corpus_is_cached_and_memory_mapped():
    first = _corpus()
    again = _corpus()
    assert isinstance(again[0], np.memmap)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_captions_name_the_digits_with_the_runs_prompt():
    from fedtune_core.proxy import objectives

    for d, name in enumerate(data.DIGIT_NAMES):
        assert models.CLIP_PROMPT.format(name) in objectives.captions(d)
    every = [c.lower() for label in range(47) for c in objectives.captions(label)]
    assert len(every) == len(set(every)), "a caption (lower-cased) must name one class"


# ---------------------------------------------------------------- training and checkpoints


@pytest.mark.parametrize("model", MODELS)
def test_foreach_adamw_pretrains_the_for_loop_steps_bytes(model, monkeypatch):
    """The checkpoint's bytes (and so its hash, which names no optimizer) are those the
    for-loop AdamW of VERSION 3 wrote."""
    images, labels = _corpus()
    recipe = dataclasses.replace(QUICK, steps=8)
    fast, _ = pretrain.train(model, recipe, images, labels)
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: real(*a, **k | {"foreach": False}))
    slow, _ = pretrain.train(model, recipe, images, labels)
    a, b = fast.state_dict(), slow.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", MODELS)
def test_pretraining_is_deterministic_and_the_checkpoint_loads_like_a_user_file(model, built):
    images, labels = _corpus()
    objective, _ = pretrain.train(model, QUICK, images, labels)
    saved = torch.load(built[model]["path"])
    mine = objective.state_dict()
    assert saved.keys() == mine.keys()
    assert all(torch.equal(saved[k], mine[k]) for k in saved), "same seed, same weights"

    loaded = models.build(model, list(data.DIGIT_NAMES), weights=built[model]["path"])
    x = objective.preprocess(torch.tensor(images[:8]))
    objective.net.eval()
    with torch.no_grad():
        net = objective.net  # CLIP's features: unit image embeddings times its logit scale
        expected = (net.encode_image(x, normalize=True) * net.logit_scale.exp()
                    if model == "clip-tiny"
                    else net.forward_head(net.forward_features(x), pre_logits=True))
        torch.testing.assert_close(loaded.eval().features(x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_seconds_of_pretraining_beat_random_init_on_a_digits_probe():
    # 500 steps of 128 on 20,000 images (~15 s): the ViT's frozen features already probe
    # digits better than random ones (a hundred steps fewer and they do not yet)
    recipe = dataclasses.replace(
        recipes.named("glyphs-weak"), corpus=glyphs.CorpusConfig(size=20_000, seed=1),
        holdout=500, steps=500, batch_size=128, warmup=50)
    meta = pretrain.ensure("vit-tiny", "glyphs-weak", recipe)
    random_init = probe.proxy_quality("vit-tiny", "none")
    assert meta["probe_val_acc"] > random_init["probe_val_acc"] + 0.03
    assert meta["probe_acc"] > random_init["probe_acc"]
    assert meta["pretrain_acc"] > 0.1  # 47 classes: chance is 0.02


@pytest.mark.slow
def test_seconds_of_contrastive_pretraining_give_clip_a_zero_shot_head():
    # undeformed glyphs, 400 steps of 32 (~10 s): the head built from "a photo of a {digit}."
    # beats chance; the probe needs a few hundred steps of 128 more to beat random features
    corpus = dataclasses.replace(QUICK.corpus, deform=0.0)
    recipe = dataclasses.replace(QUICK, corpus=corpus, steps=400, warmup=40)
    meta = pretrain.ensure("clip-tiny", "glyphs-weak", recipe)
    assert meta["zeroshot_acc"] > 0.15  # chance is 0.1
    assert probe.proxy_quality("clip-tiny", "none")["zeroshot_acc"] < 0.13


def test_sidecar_holds_the_recipe_and_the_metrics(built):
    meta = built["clip-tiny"]
    sidecar = json.loads(recipes.checkpoint_path("clip-tiny", "glyphs-weak", QUICK)
                         .with_suffix(".json").read_text())
    assert sidecar == meta
    assert meta["recipe_config"] == QUICK.to_dict()
    assert meta["hash"] == recipes.recipe_hash("clip-tiny", QUICK)
    assert meta["steps"] == 40 and meta["image_passes"] == 40 * 32
    for key in ("final_loss", "pretrain_acc", "probe_acc", "probe_val_acc", "zeroshot_acc"):
        assert isinstance(meta[key], float), key
    assert built["vit-tiny"]["zeroshot_acc"] is None


def test_the_cache_is_hit_the_second_time(built, quick_recipes, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cached checkpoint was trained again")

    monkeypatch.setattr(pretrain, "train", fail)
    assert pretrain.ensure("vit-tiny", "glyphs-weak", QUICK) == built["vit-tiny"]
    assert pretrain.ensure_all([("vit-tiny", "glyphs-weak")] * 2, jobs=2) == [built["vit-tiny"]]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete sidecar"])
def test_a_damaged_checkpoint_is_never_used_and_is_rebuilt(no_probe, damage):
    recipe = dataclasses.replace(QUICK, steps=20)  # its own checkpoint: the others stay intact
    meta = pretrain.ensure("vit-tiny", "glyphs-weak", recipe)
    path = recipes.checkpoint_path("vit-tiny", "glyphs-weak", recipe)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\0" * path.stat().st_size)
    else:
        path.with_suffix(".json").unlink()
    assert recipes.cached("vit-tiny", "glyphs-weak", recipe) is None
    again = pretrain.ensure("vit-tiny", "glyphs-weak", recipe)
    assert again["sha256"] == meta["sha256"], "rebuilt, deterministically"
    assert not list(path.parent.glob(".*.tmp")), "no temporary file left behind"


def _ensure_in_worker(recipe: pretrain.Recipe) -> dict:
    return pretrain.ensure("vit-tiny", "glyphs-weak", recipe)


def test_two_processes_build_a_checkpoint_once(no_probe):
    recipe = dataclasses.replace(QUICK, steps=21)
    with ProcessPoolExecutor(2) as pool:
        metas = list(pool.map(_ensure_in_worker, [recipe, recipe]))
    assert metas[0] == metas[1], "the second process waited and read the first one's build"


# ---------------------------------------------------------------- names in runs


def test_recipe_names_resolve_and_auto_means_strong():
    for model in MODELS:
        assert set(models.BACKBONES[model].recipes) <= set(recipes.RECIPES)
        assert models.resolve_weights(model, "auto") == ("recipe", "glyphs-strong")
        assert models.resolve_weights(model, "glyphs-weak") == ("recipe", "glyphs-weak")
        assert models.resolve_weights(model, "none") == ("none", None)
    with pytest.raises(ConfigError, match="glyphs-weak, glyphs-strong"):
        models.check_weights("vit-tiny", "glyphs-medium")
    with pytest.raises(ConfigError, match="fedtune pretrain --model vit-tiny"):
        models.build("vit-tiny", list(data.DIGIT_NAMES), "glyphs-strong")


def test_a_run_is_identified_by_its_recipe(quick_recipes, monkeypatch):
    auto, strong = RunConfig(), RunConfig(weights="glyphs-strong")
    strong_hash = recipes.recipe_hash("vit-tiny", recipes.RECIPES["glyphs-strong"])
    assert auto.to_dict()["weights"] == f"glyphs-strong@{strong_hash}"
    assert auto.hash == strong.hash != RunConfig(weights="glyphs-weak").hash
    assert RunConfig.from_dict(auto.to_dict()).hash == auto.hash
    assert RunConfig(weights="none").to_dict()["weights"] == "none"

    old_hash, old_dict = auto.hash, auto.to_dict()  # as a record written then holds them
    old_path = recipes.checkpoint_path("vit-tiny", "glyphs-strong")
    monkeypatch.setitem(recipes.RECIPES, "glyphs-strong", dataclasses.replace(QUICK, lr=1e-3))
    assert RunConfig().hash != old_hash, "a changed recipe is a different run"
    assert recipes.checkpoint_path("vit-tiny", "glyphs-strong") != old_path
    with pytest.raises(ConfigError, match="has changed since"):
        RunConfig.from_dict(old_dict)


def test_a_run_record_names_its_pretraining(quick_recipes, tiny_config, tmp_results):
    cfg = tiny_config(weights="glyphs-weak", method="head", rounds=1)
    record = claims.run(cfg, tmp_results, device="cpu")
    assert record["status"] == "ok", record.get("error")
    meta = recipes.cached("vit-tiny", "glyphs-weak")
    assert record["config"]["weights"] == f"glyphs-weak@{meta['hash']}"
    weights = record["weights"]
    assert weights["kind"] == "recipe" and weights["recipe"] == "glyphs-weak"
    for key in ("hash", "steps", "pretrain_acc", "probe_acc", "probe_val_acc", "path"):
        assert weights[key] == meta[key]
    # the run's model is the checkpoint: its frozen features match a direct load of the file
    direct = models.build("vit-tiny", list(data.DIGIT_NAMES), meta["path"])
    built_here = pretrain.build("vit-tiny", list(data.DIGIT_NAMES), "glyphs-weak")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(direct.eval().features(x), built_here.eval().features(x))


# ---------------------------------------------------------------- the command


def test_pretrain_command_reports_each_checkpoint(quick_recipes, capsys):
    assert cli.main(["pretrain", "--model", "vit-tiny", "--recipe", "glyphs-weak",
                     "--jobs", "1", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    meta = recipes.cached("vit-tiny", "glyphs-weak")
    assert len(line.splitlines()) == 1
    for part in ("vit-tiny", "glyphs-weak", meta["hash"], "steps    40", "probe acc",
                 meta["path"]):
        assert part in line, part


@pytest.mark.parametrize("argv, expected", [
    (["--model", "vit-b16"], ["'vit-b16'", "clip-tiny, vit-tiny, all"]),
    (["--recipe", "glyphs-huge"], ["'glyphs-huge'", "glyphs-weak, glyphs-strong, all"]),
    (["--jobs", "0"], ["--jobs", "0"]),
    (["--jobs", "two"], ["--jobs", "two"]),
])
def test_pretrain_command_refuses_bad_values_in_one_line(run_cli, argv, expected, monkeypatch,
                                                         tmp_path):
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run_cli(["pretrain", *argv])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert all(part in err for part in expected), err
    assert not (tmp_path / "cache").exists(), "nothing written"


def test_pretrain_command_checks_its_arguments_without_importing_torch(tmp_path):
    code = ("import sys\nfrom fedtune_core import cli\n"
            "for argv in (['pretrain', '--model', 'nope'], ['pretrain', '--recipe', 'nope'],\n"
            "             ['pretrain', '--jobs', '0']):\n"
            "    print(cli.main(argv), flush=True)\n"
            "heavy = ('torch', 'timm', 'open_clip', 'sklearn')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.stdout.split() == ["2", "2", "2", "[]"], proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 3


GRID = """
description = "pre-training in a grid"
seeds = [0]
[base]
dataset = "digits"
partition = "iid"
clients = 2
sample = 2
rounds = 1
batch_size = 64
optimizer = "adamw"
[lr]
head = 3e-3
[variants]
head = { method = "head" }
[[tuning_methods]]
model = ["vit-tiny", "clip-tiny"]
variant = "head"
weights = ["none", "glyphs-weak", "auto"]
"""


def test_a_grid_builds_its_checkpoints_first_and_records_them(no_probe, monkeypatch, tmp_path):
    from fedtune_core.study import grid, profile

    for name, steps in (("glyphs-weak", 42), ("glyphs-strong", 43)):  # not built before
        monkeypatch.setitem(recipes.RECIPES, name, dataclasses.replace(QUICK, steps=steps))

    path = tmp_path / "pre.toml"
    path.write_text(GRID)
    trained, real = [], pretrain.train

    def counting(model, recipe, *args, **kwargs):
        trained.append((model, recipe.steps))
        return real(model, recipe, *args, **kwargs)

    monkeypatch.setattr(pretrain, "train", counting)
    records = grid.ensure(profile.load_profile(path), tmp_path / "results", jobs=1,
                          progress=False)
    assert sorted(trained) == [("clip-tiny", 42), ("clip-tiny", 43), ("vit-tiny", 42),
                               ("vit-tiny", 43)], "each checkpoint once, before the runs"
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    named = {(r["config"]["model"], r["config"]["weights"]): r["weights"] for r in records}
    for model in MODELS:
        assert named[(model, "none")]["kind"] == "none"
        for name in ("glyphs-weak", "glyphs-strong"):
            meta = recipes.cached(model, name)
            assert named[(model, f"{name}@{meta['hash']}")]["recipe"] == name
    grid.ensure(profile.load_profile(path), tmp_path / "results", jobs=1, progress=False)
    assert len(trained) == 4, "the second grid trains nothing"
